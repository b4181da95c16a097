"""Exact resume: an interrupted run, resumed, ends with the weights and data order of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from test_train import tiny_config

from t5qa.fastpath.linear import onednn_linear_available


@pytest.fixture()
def dropout_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with dropout on, so an exact resume also needs the random state restored."""
    from t5qa.modeling import load_model, read_meta, save_model

    model, tokenizer = load_model(str(tiny_model_dir))
    model.config.dropout_rate = 0.2
    out = tmp_path / "dropout-model"
    save_model(model, tokenizer, out, read_meta(tiny_model_dir))
    return out


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Patch the collator used by train.py to record the example indices of every micro-batch."""
    import t5qa.train as train

    seen: list[list[int]] = []
    real = train.make_collator

    def recording_collator(tokenizer: Any):
        collate = real(tokenizer)

        def wrapped(features: list[dict]) -> dict:
            seen.append([f["example_index"] for f in features])
            return collate(features)

        return wrapped

    monkeypatch.setattr(train, "make_collator", recording_collator)
    real_first = train._first_micro_batch

    def first_micro_batch(*args: Any, **kwargs: Any) -> dict:  # the fast paths' proof batch is not training
        batch = real_first(*args, **kwargs)
        seen.pop()
        return batch

    monkeypatch.setattr(train, "_first_micro_batch", first_micro_batch)
    return seen


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name


# 24 examples in micro-batches of 4 with accumulation 2: 6 micro-batches = 3 steps per epoch, so 8 steps
# cross two epoch boundaries; the interruption at step 4 lands mid-epoch (1 step into the second epoch).
SETTINGS = dict(max_steps=8, train_batch_size=4, gradient_accumulation_steps=2, eval_every_steps=2,
                learning_rate=3e-3, warmup_steps=2, lr_scheduler="cosine", weight_decay=0.01)


def test_interrupted_then_resumed_equals_uninterrupted(dropout_model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from t5qa.train import StopTraining, fit

    seen = record_batches(monkeypatch)
    fit(tiny_config(dropout_model_dir, tmp_path / "a", **SETTINGS))
    # dropout masks come from t5qa's fast dropout, so resuming them exactly is part of what is tested
    run_summary = json.loads((tmp_path / "a" / "run" / "run_summary.json").read_text())
    used = set(run_summary["fast_paths"]["used"])
    assert {"dropout", "norm", "clip_in_step"} <= used
    assert ("linear" in used) is onednn_linear_available()  # and its oneDNN products, where this torch has them
    straight_order = list(seen)
    seen.clear()

    def interrupt(step: int, metrics: dict) -> None:
        if step == 4:
            raise StopTraining("simulated interruption")

    first = fit(tiny_config(dropout_model_dir, tmp_path / "b", **SETTINGS), on_evaluate=interrupt)
    assert first.steps == 4
    # The data loader collates one micro-batch ahead; the interrupted run trained on 4 steps x 2 of them.
    assert len(seen) >= 8
    del seen[8:]
    resumed = fit(tiny_config(dropout_model_dir, tmp_path / "b", resume=True, **SETTINGS))
    assert resumed.steps == 8
    assert seen == straight_order  # same micro-batches, same order, none repeated or skipped
    assert_same(weights(tmp_path / "b" / "run"), weights(tmp_path / "a" / "run"))
    # The metrics file reads as one run: each step logged once, in order.
    rows = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    summary = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert summary["samples_seen"] == json.loads((tmp_path / "a" / "run" / "summary.json").read_text())["samples_seen"]


def test_corrupted_checkpoint_falls_back_to_the_previous_good_one(tiny_model_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from t5qa.checkpoint import verify_checkpoint
    from t5qa.train import fit

    settings = dict(max_steps=6, save_every_steps=2, keep_checkpoints=3, learning_rate=3e-3)
    fit(tiny_config(tiny_model_dir, tmp_path / "a", **settings))
    fit(tiny_config(tiny_model_dir, tmp_path / "b", **settings))
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"]
    damaged = checkpoints / "step-4" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert "checksum" in verify_checkpoint(checkpoints / "step-4")

    caplog.set_level("INFO", logger="t5qa.train")
    result = fit(tiny_config(tiny_model_dir, tmp_path / "b", resume=True, **settings))
    assert "step-4 cannot be used" in caplog.text and "resumed from" in caplog.text and "step-2" in caplog.text
    assert result.steps == 6
    # Steps 3..6 were trained again from step 2: the result equals the uninterrupted run.
    assert_same(weights(tmp_path / "b" / "run"), weights(tmp_path / "a" / "run"))


def test_incomplete_checkpoint_without_marker_is_never_used(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.errors import CheckpointError
    from t5qa.checkpoint import CHECKPOINT_MARKER
    from t5qa.train import fit

    fit(tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every_steps=2))
    (tmp_path / "run" / "checkpoints" / "step-2" / CHECKPOINT_MARKER).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        fit(tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every_steps=2, resume=True))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.checkpoint import verify_checkpoint
    from test_train import make_data

    data = make_data(tmp_path, n_train=48)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "t5qa", "train", "--model", str(tiny_model_dir), "--train", str(data["train"]),
            "--validation", str(data["validation"]), "--output", str(run), "--max-steps", "100000",
            "--train-batch-size", "2", "--save-every-steps", "5", "--max-source-tokens", "128",
            "--stride-tokens", "32", "--max-target-tokens", "16", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step-5").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert f"Resume with: t5qa train --config {run / 'config.yaml'} --resume" in err
    newest = max((p for p in (run / "checkpoints").glob("step-*")), key=lambda p: int(p.name[5:]))
    assert verify_checkpoint(newest) is None
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] >= 5 and not (run / "last").exists()
