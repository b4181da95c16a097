"""The training loop (`t5qa.train.setup` / `fit`) on a tiny model: run directory, safety stops, early stopping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import synthetic_copy_examples
from t5qa.config import load_train_config
from t5qa.data import write_jsonl
from t5qa.errors import ConfigError, TrainingError


def make_data(root: Path, n_train: int = 24, n_val: int = 6) -> dict[str, Path]:
    """Write synthetic train/validation JSONL files under root."""
    paths = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    write_jsonl(synthetic_copy_examples(n_train, seed=3), paths["train"])
    write_jsonl(synthetic_copy_examples(n_val, seed=4), paths["validation"])
    return paths


def tiny_config(model_dir: Path, root: Path, **overrides: Any):
    """A TrainConfig for a run of a few seconds on the tiny model."""
    data = make_data(root)
    values: dict[str, Any] = dict(
        model=str(model_dir), train=str(data["train"]), validation=str(data["validation"]),
        output=str(root / "run"), train_batch_size=4, batch_size=8, max_steps=4, learning_rate=1e-3,
        max_source_tokens=128, stride_tokens=32, max_target_tokens=16, log_every_steps=1, seed=5,
    )
    values.update(overrides)
    return load_train_config(None, **values)


def test_run_directory_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from t5qa.train import fit

    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=4, eval_every_steps=2)
    result = fit(cfg)
    run = tmp_path / "run"
    assert result.output_dir == run and result.steps == 4

    # best/ and last/ load with transformers alone, and carry the encode settings predict needs.
    for name in ("best", "last"):
        model = AutoModelForSeq2SeqLM.from_pretrained(run / name)
        assert model.config.model_type == "t5"
        meta = json.loads((run / name / "t5qa.json").read_text())
        assert meta["encode"]["max_source_tokens"] == 128 and meta["encode"]["stride_tokens"] == 32
        assert meta["encode"]["prompt_template"] == cfg.encode.prompt_template
        assert "encode" not in meta["train_config"] and "max_source_tokens" not in meta  # each setting once
        assert meta["train_config"]["learning_rate"] == 1e-3
        assert meta["answer_tokens_p99"] >= 2  # one answer token at least, + </s>

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "samples_per_second", "epoch"} <= set(train_rows[0])
    assert [r["step"] for r in val_rows] == [2, 4]
    assert {"loss", "token_accuracy", "exact_match", "f1"} <= set(val_rows[0])

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped_early"] is False
    assert summary["best_step"] in (2, 4) and summary["final_metrics"]["f1"] == val_rows[-1]["f1"]
    assert summary["train_seconds"] > 0 and summary["eval_seconds"] > 0  # kept apart: two evaluations ran
    assert "seconds in evaluation" in (run / "report.md").read_text()
    run_summary = json.loads((run / "run_summary.json").read_text())
    assert run_summary["examples"] == 24 and run_summary["validation_examples"] == 6
    assert run_summary["effective_batch_size"] == 4 and run_summary["total_steps"] == 4

    for name in ("config.yaml", "eval_predictions.jsonl", "loss.png", "learning_rate.png", "em_f1.png",
                 "report.md"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard" / "t5qa").glob("events.out.tfevents.*"))
    predictions = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    # The only checkpoint is the step-2 evaluation's: the final step writes last/ instead.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]


def test_summary_counts_accumulation_and_epochs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import setup

    # 24 examples / batch 4 = 6 micro-batches per epoch; accumulation 4 -> 2 steps per epoch (the second one
    # takes the last 2 micro-batches); 2.5 epochs -> 5 steps.
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=None, epochs=2.5, gradient_accumulation_steps=4)
    run = setup(cfg)
    assert run.micro_batches_per_epoch == 6
    assert run.steps_per_epoch == 2 and run.total_steps == 5
    assert run.summary["effective_batch_size"] == 16


def test_without_validation_file_contexts_are_held_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import load_run_examples, setup

    cfg = tiny_config(tiny_model_dir, tmp_path, validation=None, val_fraction=0.25)
    run = setup(cfg)
    assert len(run.validation_examples) == 6 and run.train_examples == 18
    train, validation = load_run_examples(cfg, run.tokenizer)
    assert [e.id for e in validation] == [e.id for e in run.validation_examples] and len(train) == 18
    assert not {e.context for e in train} & {e.context for e in validation}


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_adafactor_uses_the_given_learning_rate(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers.optimization import Adafactor

    from t5qa.train import setup

    run = setup(tiny_config(tiny_model_dir, tmp_path, optimizer="adafactor", learning_rate=2e-3, warmup_steps=2))
    optimizer = run.optimizer.optimizer  # Accelerate's wrapper holds the real one
    assert isinstance(optimizer, Adafactor)
    assert optimizer.defaults["relative_step"] is False and optimizer.defaults["scale_parameter"] is False
    # Linear warmup from 0 over 2 steps towards the peak 2e-3.
    assert run.scheduler.get_last_lr()[0] == 0.0
    run.scheduler.step()
    assert run.scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_fp16_is_refused_for_t5_with_the_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit

    with pytest.raises(ConfigError, match="fp16.*overflow.*bf16"):
        fit(tiny_config(tiny_model_dir, tmp_path, precision="fp16"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit

    with pytest.raises(ConfigError, match="--resume: .* no checkpoint"):
        fit(tiny_config(tiny_model_dir, tmp_path, resume=True))
    fit(tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every_steps=1))
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        fit(tiny_config(tiny_model_dir, tmp_path, max_steps=3))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import T5ForConditionalGeneration

    from t5qa.checkpoint import verify_checkpoint
    from t5qa.train import fit

    # The 3rd training forward pass returns a NaN loss (evaluation forward passes are not counted).
    forward = T5ForConditionalGeneration.forward
    calls = [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T5ForConditionalGeneration, "forward", poisoned)
    from t5qa import fastpath

    real_enable = fastpath.enable

    def enable_uncounted(*args, **kwargs):  # the fast paths' start-up proof runs training passes too
        before = calls[0]
        fast = real_enable(*args, **kwargs)
        calls[0] = before
        return fast

    monkeypatch.setattr(fastpath, "enable", enable_uncounted)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=6, save_every_steps=2, max_grad_norm=None)
    with pytest.raises(TrainingError) as info:
        fit(cfg)
    message = str(info.value)
    assert "step 3" in message and "--learning-rate" in message and "bf16" in message
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert str(checkpoint) in message
    assert verify_checkpoint(checkpoint) is None
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step-2"]
    assert not (tmp_path / "run" / "last").exists()


def test_early_stopping_keeps_the_best_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit

    # A learning rate so small that the predictions never change: the first evaluation stays the best, and
    # two evaluations without improvement stop the run at step 3 of 20.
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=20, learning_rate=1e-9, eval_every_steps=1,
                      metric_for_best="exact_match", early_stopping_patience=2)
    result = fit(cfg)
    assert result.stopped_early and result.steps == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_step"] == 1 and summary["stopped_early"] is True
    assert json.loads((tmp_path / "run" / "best" / "t5qa.json").read_text())["step"] == 1
    assert json.loads((tmp_path / "run" / "last" / "t5qa.json").read_text())["step"] == 3


def test_loss_as_best_metric_prefers_lower(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit

    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=6, learning_rate=3e-3, eval_every_steps=2,
                      metric_for_best="loss")
    result = fit(cfg)
    history = json.loads((tmp_path / "run" / "summary.json").read_text())["eval_history"]
    assert result.best_metric == min(h["loss"] for h in history)


def test_on_evaluate_stop_training_ends_the_run_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import StopTraining, fit

    seen: list[tuple[int, dict]] = []

    def prune(step: int, metrics: dict) -> None:
        seen.append((step, metrics))
        if step == 2:
            raise StopTraining("pruned")

    result = fit(tiny_config(tiny_model_dir, tmp_path, max_steps=8, eval_every_steps=1), on_evaluate=prune)
    assert [s for s, _ in seen] == [1, 2]
    assert "f1" in seen[0][1] and result.steps == 2
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
