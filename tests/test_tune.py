"""Hyperparameter search: space parsing, pruning, results files, resuming, stale trials, concurrent workers.

Most tests drive `run_search` with `fake_fit`, a stand-in for `train.fit` whose validation F1 is a known
function of the learning rate, so the search logic is checked in seconds and exactly. The tests marked slow run
the real `t5qa tune` command with the real `fit` on the tiny model.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from t5qa.config import TrainConfig, load_train_config  # noqa: E402
from t5qa.errors import ConfigError, TrainingError  # noqa: E402
from t5qa.train import StopTraining, TrainResult  # noqa: E402
from t5qa.tune import DEFAULT_SPACE, load_search_config, parse_space, run_search  # noqa: E402

EVALUATIONS = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_fit(cfg: TrainConfig, *, on_evaluate=None) -> TrainResult:
    """Stand-in for train.fit: F1 peaks at learning_rate 1e-3 and grows with each of 4 evaluations.

    It logs every evaluation it performs to OUTPUT/evaluations.jsonl and stops on StopTraining like fit does.
    """
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=False)  # a trial directory is never reused
    quality = 100.0 * math.exp(-4.0 * (math.log10(cfg.learning_rate) + 3.0) ** 2)  # 100 at lr 1e-3
    best, stopped, step = None, False, 0
    (out / "pid").write_text(str(os.getpid()))
    (out / "model").write_text(cfg.model)
    with open(out / "evaluations.jsonl", "w") as log:
        for k in range(1, EVALUATIONS + 1):
            step = 5 * k
            f1 = quality * k / EVALUATIONS
            best = f1 if best is None else max(best, f1)
            log.write(json.dumps({"step": step, "f1": f1}) + "\n")
            log.flush()
            try:
                if on_evaluate is not None:
                    on_evaluate(step, {"f1": f1, "exact_match": f1 / 2, "loss": 10.0 - f1 / 10, "count": 8})
            except StopTraining:
                stopped = True
                break
    return TrainResult(output_dir=out, best_dir=out / "best", last_dir=out / "last", best_metric=best,
                       final_metrics={"f1": best}, steps=step, stopped_early=stopped)


def _base(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(model="unused-by-fake-fit", train=str(tmp_path / "train.jsonl"), max_steps=20, **kw)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _storage_trials(output: Path, study_name: str = "t5qa") -> list:
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{output / 'study.db'}")
    return study.get_trials(deepcopy=False)


# ---- the search space


def test_default_space_has_the_documented_ranges():
    params = {p.name: p for p in parse_space(None)}
    assert set(params) == set(DEFAULT_SPACE)
    lr = params["learning_rate"]
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-4, 3e-3, True, False)
    assert params["train_batch_size"].choices == (8, 16, 32)
    assert params["epochs"].integer and (params["epochs"].low, params["epochs"].high) == (1, 5)
    assert not params["warmup_ratio"].integer and params["weight_decay"].high == 0.1


def test_space_accepts_yaml_number_strings_and_model_choices():
    params = {p.name: p for p in parse_space({"learning_rate": {"low": "1e-4", "high": "1e-3", "log": True},
                                              "model": ["models/tiny", "models/mini"],
                                              "warmup_ratio": {"low": 0, "high": 1}})}
    assert params["learning_rate"].low == pytest.approx(1e-4)  # YAML reads 1e-4 as text
    assert params["model"].choices == ("models/tiny", "models/mini")
    assert not params["warmup_ratio"].integer  # a float setting stays continuous with whole-number bounds


def test_space_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        parse_space({"learnin_rate": [1e-3], "train_batch_size": [], "epochs": {"low": 5, "high": 1},
                     "weight_decay": {"low": 0, "high": 0.1, "log": True}, "output": ["a"], "seed": 3},
                    source="search.yaml:search")
    message = str(info.value)
    for needle in ("search.yaml:search.learnin_rate is not a TrainConfig setting", "train_batch_size: the list",
                   "epochs: low must be below high", "weight_decay: a log range needs low > 0",
                   "output is fixed by the search", "seed: give a list of choices or a range"):
        assert needle in message


def test_search_config_splits_the_space_from_the_base_config(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("model: models/tiny\nmax_steps: 30\nmax_source_tokens: 256\n"
                    "search:\n  learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}\n  train_batch_size: [4, 8]\n")
    base, space = load_search_config(path, max_steps=12, train="data/train.jsonl")
    assert (base.model, base.max_steps, base.train, base.encode.max_source_tokens) == (
        "models/tiny", 12, "data/train.jsonl", 256)  # flags win over the file
    assert space == {"learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}, "train_batch_size": [4, 8]}


# ---- searching with the stand-in fit


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished 6-trial search with the stand-in fit."""
    tmp_path = tmp_path_factory.mktemp("searched")
    out = tmp_path / "search"
    result = run_search(_base(tmp_path), trials=6, output=out, train_fn=fake_fit, pruner_startup_trials=2)
    return out, result


def test_search_writes_table_best_config_and_plots(searched):
    out, result = searched
    rows = _rows(out / "trials.csv")
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert result.n_complete + result.n_pruned == 6 and result.n_complete == sum(r["state"] == "COMPLETE" for r in rows)
    # max_steps fixes the trial length, so epochs is dropped from the default space.
    assert {"learning_rate", "train_batch_size", "warmup_ratio", "weight_decay"} <= set(rows[0])
    assert "epochs" not in rows[0]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best_row = max(complete, key=lambda r: float(r["value"]))
    assert result.best_trial == int(best_row["number"])
    assert result.best_value == pytest.approx(float(best_row["value"]))
    # The stand-in's F1 is an exact function of the learning rate.
    lr = result.best_params["learning_rate"]
    assert result.best_value == pytest.approx(100.0 * math.exp(-4.0 * (math.log10(lr) + 3.0) ** 2))

    cfg = load_train_config(result.best_config_path)
    assert cfg.learning_rate == pytest.approx(lr)
    assert cfg.train_batch_size == result.best_params["train_batch_size"]
    assert cfg.output == str(out / "best-run") and cfg.metric_for_best == "f1" and cfg.max_steps == 20
    assert cfg.save_every_steps is None  # the trials' checkpoint switch-off is not carried over
    assert result.best_run_dir == out / f"trial-{result.best_trial:04d}"

    names = {p.name for p in result.plot_paths}
    assert names == {"optimization_history.png", "intermediate_values.png", "param_importances.png"}
    for path in result.plot_paths:
        assert path.read_bytes()[:8] == PNG_MAGIC


def _fit_constant(cfg: TrainConfig, *, on_evaluate=None) -> TrainResult:
    out = Path(cfg.output)
    out.mkdir(parents=True)
    on_evaluate(5, {"f1": 0.0})
    return TrainResult(output_dir=out, best_dir=out / "best", last_dir=out / "last", best_metric=0.0,
                       final_metrics={}, steps=5, stopped_early=False)


def test_importances_are_skipped_when_they_cannot_mean_anything(tmp_path):
    one = run_search(_base(tmp_path), trials=1, output=tmp_path / "one", train_fn=fake_fit)
    assert {p.name for p in one.plot_paths} == {"optimization_history.png", "intermediate_values.png"}
    assert one.best_config_path.is_file()
    flat = run_search(_base(tmp_path), trials=3, output=tmp_path / "flat", train_fn=_fit_constant)
    assert flat.n_complete == 3 and "param_importances.png" not in {p.name for p in flat.plot_paths}


def test_a_model_preset_is_initialised_with_the_base_tokenizer(tmp_path, tiny_model_dir):
    from t5qa.modeling import load_model

    out = tmp_path / "search"
    base = TrainConfig(model=str(tiny_model_dir), train=str(tmp_path / "train.jsonl"), max_steps=20)
    result = run_search(base, trials=2, output=out, train_fn=fake_fit, space={
        "model": ["tiny"], "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True}})
    preset_dir = out / "models" / "tiny"
    assert [(out / f"trial-{n:04d}" / "model").read_text() for n in (0, 1)] == [str(preset_dir)] * 2
    model, tokenizer = load_model(str(preset_dir))
    _, base_tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.get_vocab() == base_tokenizer.get_vocab()
    assert load_train_config(result.best_config_path).model == str(preset_dir)
    assert result.best_params["model"] == "tiny"


def test_unpromising_trials_are_pruned_and_stop_training(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    # Two finished trials that reached F1 90 at every evaluation: the stand-in's F1 at its second evaluation is
    # at most 50, below their median, so every new trial must be pruned there (never at the first evaluation).
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="t5qa", direction="maximize")
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(
            value=90.0, intermediate_values={k: 90.0 for k in range(1, EVALUATIONS + 1)}))
    result = run_search(_base(tmp_path), trials=5, output=out, train_fn=fake_fit, pruner_startup_trials=2)
    rows = {int(r["number"]): r for r in _rows(out / "trials.csv")}
    assert [rows[n]["state"] for n in sorted(rows)] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    assert (result.n_complete, result.n_pruned) == (2, 3)
    for n in (2, 3, 4):
        evaluations = (out / f"trial-{n:04d}" / "evaluations.jsonl").read_text().splitlines()
        assert len(evaluations) == 2  # the stand-in stopped training when told to
        assert int(rows[n]["evaluations"]) == 2
        assert float(rows[n]["value"]) == pytest.approx(json.loads(evaluations[-1])["f1"])


def test_trials_below_the_median_are_pruned_in_a_plain_search(searched):
    out, result = searched
    rows = _rows(out / "trials.csv")
    for r in rows:
        n_evals = len((out / f"trial-{int(r['number']):04d}" / "evaluations.jsonl").read_text().splitlines())
        assert int(r["evaluations"]) == n_evals
        assert (n_evals == EVALUATIONS) == (r["state"] == "COMPLETE")


def test_resuming_runs_only_the_remaining_trials(tmp_path):
    out = tmp_path / "search"
    run_search(_base(tmp_path), trials=2, output=out, train_fn=fake_fit)
    first = {t.number: (t.params, t.value, t.datetime_complete) for t in _storage_trials(out)}
    result = run_search(_base(tmp_path), trials=3, output=out, train_fn=fake_fit)
    trials = _storage_trials(out)
    assert [t.number for t in trials] == [0, 1, 2]
    assert {t.number: (t.params, t.value, t.datetime_complete) for t in trials if t.number < 2} == first
    assert result.n_complete + result.n_pruned == 3
    assert trials[2].params != trials[0].params  # a resumed search draws new points
    # Asking again for 3 trials runs nothing.
    run_search(_base(tmp_path), trials=3, output=out, train_fn=fake_fit)
    assert len(_storage_trials(out)) == 3


def test_a_killed_runs_trial_is_failed_and_retried_with_its_parameters(tmp_path):
    import time

    from optuna.distributions import FloatDistribution

    out = tmp_path / "search"
    out.mkdir()
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="t5qa", direction="maximize")
    # A trial left RUNNING by a process that died: it sent one heartbeat, then nothing.
    dead = study.ask({"learning_rate": FloatDistribution(1e-4, 3e-3, log=True)})
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3)
    result = run_search(_base(tmp_path), trials=2, output=out, train_fn=fake_fit, space={
        "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True}}, heartbeat_interval_s=1, grace_period_s=2)
    trials = _storage_trials(out)
    assert trials[0].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params["learning_rate"] == dead.params["learning_rate"]
    assert result.n_complete + result.n_pruned == 2


def _slow_fake_fit(cfg: TrainConfig, *, on_evaluate=None) -> TrainResult:
    # An instant trial lets the first worker finish the whole study before the second one starts.
    time.sleep(0.3)
    return fake_fit(cfg, on_evaluate=on_evaluate)


def _worker(output: str, tmp: str, trials: int) -> None:
    run_search(_base(Path(tmp)), trials=trials, output=output, train_fn=_slow_fake_fit, pruner_startup_trials=2,
               heartbeat_interval_s=1, grace_period_s=5)


def test_two_workers_share_one_study_without_overshoot(tmp_path):
    out = tmp_path / "search"
    # Both workers start on a database that does not exist yet, so they also race to create it.
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(str(out), str(tmp_path), 7)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = _storage_trials(out)
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 7
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    # Each counted trial has its own directory, and both workers ran some of them.
    dirs = sorted(p.name for p in out.glob("trial-*"))
    assert dirs == [f"trial-{t.number:04d}" for t in counted]
    pids = {(out / d / "pid").read_text() for d in dirs}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert len(_rows(out / "trials.csv")) == 7


def _fit_failing_odd_trials(cfg: TrainConfig, *, on_evaluate=None) -> TrainResult:
    if int(Path(cfg.output).name.split("-")[1]) % 2:
        raise TrainingError("non-finite training loss nan at step 3")
    return fake_fit(cfg, on_evaluate=on_evaluate)


def _fit_always_failing(cfg: TrainConfig, *, on_evaluate=None) -> TrainResult:
    raise TrainingError("non-finite training loss nan at step 1")


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(tmp_path):
    out = tmp_path / "search"
    result = run_search(_base(tmp_path), trials=3, output=out, train_fn=_fit_failing_odd_trials)
    states = [r["state"] for r in _rows(out / "trials.csv")]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert (result.n_complete, result.n_failed) == (3, 2)
    assert _rows(out / "trials.csv")[1]["error"] == "non-finite training loss nan at step 3"


def test_a_search_whose_trials_all_fail_stops(tmp_path):
    with pytest.raises(TrainingError, match="3 trials in a row failed.*non-finite.*narrow the search space"):
        run_search(_base(tmp_path), trials=5, output=tmp_path / "search", train_fn=_fit_always_failing)
    assert len(_storage_trials(tmp_path / "search")) == 3


# ---- metrics and errors


def test_loss_is_minimised_and_a_study_keeps_its_direction(tmp_path):
    out = tmp_path / "search"
    result = run_search(_base(tmp_path), trials=3, output=out, train_fn=fake_fit, metric_for_best="loss")
    values = [float(r["value"]) for r in _rows(out / "trials.csv") if r["state"] == "COMPLETE"]
    assert result.best_value == pytest.approx(min(values))
    with pytest.raises(ConfigError, match="--study-name"):
        run_search(_base(tmp_path), trials=4, output=out, train_fn=fake_fit, metric_for_best="f1")


@pytest.mark.parametrize("kwargs, match", [
    ({"metric_for_best": "bleu"}, "--metric-for-best must be one of"),
    ({"trials": 0}, "--trials must be at least 1"),
    ({"storage": "study.db"}, "--storage must be a database URL"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, match):
    args = {"trials": 1, "output": tmp_path / "s", "train_fn": fake_fit, **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_search(_base(tmp_path), **args)


def test_trial_directories_of_another_study_are_refused(tmp_path):
    out = tmp_path / "search"
    (out / "trial-0000").mkdir(parents=True)
    with pytest.raises(ConfigError, match="trial-0000 from another study"):
        run_search(_base(tmp_path), trials=1, output=out, train_fn=fake_fit)


def test_tune_command_reports_a_bad_flag_on_one_line(tmp_path, capsys):
    from t5qa.cli import main

    code = main(["tune", "--trials", "0", "--output", str(tmp_path / "s"), "--train", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --trials must be at least 1, got 0"


# ---- the real command with the real fit on the tiny model


@pytest.fixture()
def tune_data(tmp_path):
    from conftest import synthetic_copy_examples
    from t5qa.data import write_jsonl

    write_jsonl(synthetic_copy_examples(24, seed=0), tmp_path / "train.jsonl")
    write_jsonl(synthetic_copy_examples(6, seed=1), tmp_path / "validation.jsonl")
    (tmp_path / "search.yaml").write_text(
        "max_steps: 4\neval_every_steps: 2\nlog_every_steps: 2\nmax_source_tokens: 96\nstride_tokens: 32\n"
        "search:\n  learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}\n  train_batch_size: [4, 8]\n")
    return tmp_path


def _tune_argv(tiny_model_dir, data: Path, trials: int) -> list[str]:
    return ["tune", "--model", str(tiny_model_dir), "--train", str(data / "train.jsonl"),
            "--validation", str(data / "validation.jsonl"), "--config", str(data / "search.yaml"),
            "--trials", str(trials), "--output", str(data / "search")]


@pytest.mark.slow
def test_tune_command_runs_real_trials_and_resumes(tiny_model_dir, tune_data, capsys):
    from t5qa.cli import main

    out = tune_data / "search"
    assert main(_tune_argv(tiny_model_dir, tune_data, 2)) == 0
    first = {t.number: (t.params, t.value, t.datetime_complete) for t in _storage_trials(out)}
    assert main(_tune_argv(tiny_model_dir, tune_data, 3)) == 0
    printed = capsys.readouterr().out
    trials = _storage_trials(out)
    assert [t.number for t in trials] == [0, 1, 2]
    assert {t.number: (t.params, t.value, t.datetime_complete) for t in trials if t.number < 2} == first
    assert "best config:" in printed and "learning_rate" in printed
    # Each trial is a normal training run: its metrics log, best model and report are there.
    for t in trials:
        run = out / f"trial-{t.number:04d}"
        assert (run / "metrics.jsonl").is_file() and (run / "best" / "t5qa.json").is_file()
        assert (run / "report.md").is_file()
        assert load_train_config(run / "config.yaml").train_batch_size == t.params["train_batch_size"]
    cfg = load_train_config(out / "best_config.yaml")
    assert cfg.model == str(tiny_model_dir) and cfg.max_steps == 4 and cfg.eval_every_steps == 2
    assert (out / "optimization_history.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_two_tune_processes_share_one_sqlite_study(tiny_model_dir, tune_data):
    import subprocess

    argv = [sys.executable, "-m", "t5qa", "-q"] + _tune_argv(tiny_model_dir, tune_data, 3)
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    trials = _storage_trials(tune_data / "search")
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3
    assert len({t.number for t in trials}) == len(trials)


def test_the_search_settings_have_one_home(tmp_path):
    from t5qa.config import TuneConfig

    with pytest.raises(ConfigError, match="--trials and --output are required"):
        TuneConfig()
    search = TuneConfig(trials=2, output=str(tmp_path / "s"), metric_for_best="loss")
    result = run_search(_base(tmp_path), search, train_fn=fake_fit)
    assert result.n_complete + result.n_pruned == 2
    assert (tmp_path / "s" / "study.db").is_file()
