"""Experiment trackers through Accelerate (`--report-to`): MLflow offline in a local file store, read back;
TensorBoard's scalars and plots; a resumed run continuing its MLflow run; one-line errors for bad choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t5qa.errors import ConfigError
from test_train import tiny_config


def test_report_to_is_checked_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from t5qa.tracking import check_report_to

    assert check_report_to(("tensorboard", "mlflow", "tensorboard")) == ("tensorboard", "mlflow")
    assert check_report_to(("none",)) == ()
    with pytest.raises(ConfigError, match="unknown tracker neptune; choose from tensorboard, wandb"):
        check_report_to(("tensorboard", "neptune"))
    with pytest.raises(ConfigError, match="cannot be combined"):
        check_report_to(("none", "mlflow"))
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--report-to wandb: the wandb package is not installed; pip install wandb"):
        check_report_to(("wandb",))


def test_an_unknown_tracker_stops_train_before_loading_anything(tmp_path: Path) -> None:
    from t5qa.train import fit

    cfg = tiny_config(tmp_path / "no-such-model", tmp_path, report_to=("tensorboard", "neptune"))
    with pytest.raises(ConfigError, match="unknown tracker neptune"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_flat_config_holds_scalars_only() -> None:
    from t5qa.config import TrainConfig
    from t5qa.tracking import flat_config

    flat = flat_config(TrainConfig(lora_target_modules=("q", "v")))
    assert flat["encode.max_source_tokens"] == TrainConfig().encode.max_source_tokens
    assert flat["lora_target_modules"] == "q,v" and flat["validation"] == "None"
    assert flat["report_to"] == "tensorboard"
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLflow's local file store in tmp_path, offline (the file backend is opt-in since MLflow 3)."""
    pytest.importorskip("mlflow", reason="mlflow-skinny is a dev dependency (t5qa[track])")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_same_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6)


@pytest.mark.slow
def test_mlflow_and_tensorboard_get_the_config_metrics_and_plots(tiny_model_dir: Path, tmp_path: Path,
                                                                 mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t5qa.train import fit

    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=4, eval_every_steps=2,
                      report_to=("mlflow", "tensorboard"), tracker_project="qa-tests")
    fit(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_loss = sorted((r["step"], r["loss"]) for r in rows if r["split"] == "train")
    val_f1 = sorted((r["step"], r["f1"]) for r in rows if r["split"] == "validation")

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("qa-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert json.loads((run / "trackers.json").read_text())["mlflow_run_id"] == logged.info.run_id
    assert logged.data.params["learning_rate"] == "0.001"
    assert logged.data.params["encode.max_source_tokens"] == "128"
    assert_same_series(_history(client, logged.info.run_id, "train/loss"), train_loss)
    assert_same_series(_history(client, logged.info.run_id, "validation/f1"), val_f1)
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "report")}
    assert {"report/loss.png", "report/em_f1.png", "report/report.md", "report/summary.json"} <= artifacts

    events = EventAccumulator(str(run / "tensorboard" / "qa-tests"), size_guidance={"images": 0}).Reload()
    assert_same_series([(e.step, e.value) for e in events.Scalars("train/loss")], train_loss)
    assert "plots/loss" in events.Tags()["images"]


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(tiny_model_dir: Path, tmp_path: Path, mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    from t5qa.train import StopTraining, fit

    def interrupt(step: int, metrics: dict) -> None:
        if step == 2:
            raise StopTraining("simulated interruption")

    settings = dict(max_steps=4, eval_every_steps=2, report_to=("mlflow",))
    assert fit(tiny_config(tiny_model_dir, tmp_path, **settings), on_evaluate=interrupt).steps == 2
    assert fit(tiny_config(tiny_model_dir, tmp_path, resume=True, **settings)).steps == 4

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("t5qa").experiment_id])
    assert len(runs) == 1  # one run, not one per process start
    assert [step for step, _ in _history(client, runs[0].info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "tensorboard").exists()  # not asked for
