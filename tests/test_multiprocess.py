"""Two CPU processes (gloo) train like one process with the same effective batch.

The processes are started by torchrun (`python -m torch.distributed.run --standalone --nproc_per_node 2`), the
launcher `accelerate launch` runs underneath, with ACCELERATE_USE_CPU so Accelerate joins them over gloo on CPU,
as `accelerate launch --multi_cpu` does. No `accelerate config` file is needed, so the test runs on a clean
machine. Both runs use the CPU fast paths, clipping inside the optimizer step included (DDP keeps whole gradients
on every process), so their agreement covers those paths under DDP too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import make_data

pytestmark = [pytest.mark.slow]

COMMON = ["--max-steps", "6", "--learning-rate", "3e-3", "--save-every-steps", "3", "--log-every-steps", "1",
          "--max-source-tokens", "128", "--stride-tokens", "32", "--max-target-tokens", "16", "--no-progress",
          "--seed", "5"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1")


def _train(argv: list[str], processes: int) -> None:
    env = _env()
    if processes == 1:
        cmd = [sys.executable, "-m", "t5qa", *argv]
    else:
        # torchrun starts the processes; ACCELERATE_USE_CPU makes Accelerate join them over gloo on CPU
        # (what `accelerate launch --multi_cpu` sets up on a machine with several CPU nodes or MPI).
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--standalone", "-m", "t5qa", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_one_and_two(model_dir: Path, tmp_path: Path, *extra: str) -> tuple[list[str], dict]:
    """Train one process with batch 8 (tmp_path/one) and two with batch 4 (tmp_path/two) for 6 steps; check they
    saw the same samples and, step by step, the same training loss up to how the token mean is split across
    processes. Returns the common arguments and the two-process run's run_summary.json."""
    data = make_data(tmp_path, n_train=32, n_val=4)
    base = ["train", "--model", str(model_dir), "--train", str(data["train"]),
            "--validation", str(data["validation"]), *COMMON, *extra]
    _train([*base, "--output", str(tmp_path / "one"), "--train-batch-size", "8"], processes=1)
    _train([*base, "--output", str(tmp_path / "two"), "--train-batch-size", "4"], processes=2)
    one, two = json.loads((tmp_path / "one" / "summary.json").read_text()), \
        json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["samples_seen"] == two["samples_seen"] == 6 * 8
    loss_one = [r["loss"] for r in _rows(tmp_path / "one") if r["split"] == "train"]
    loss_two = [r["loss"] for r in _rows(tmp_path / "two") if r["split"] == "train"]
    assert len(loss_one) == len(loss_two) == 6
    for a, b in zip(loss_one, loss_two):
        assert abs(a - b) <= 0.05 * a, (loss_one, loss_two)
    return base, json.loads((tmp_path / "two" / "run_summary.json").read_text())


def test_two_processes_match_one_with_the_same_effective_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, run_summary = train_one_and_two(tiny_model_dir, tmp_path)
    assert run_summary["processes"] == 2 and run_summary["effective_batch_size"] == 8
    assert "clip_in_step" in run_summary["fast_paths"]["used"]
    w1, w2 = load_file(str(tmp_path / "one" / "last" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    # Adam's per-weight normalisation amplifies the tiny loss-split differences in near-zero gradients, so the
    # weights agree in aggregate (relative L1 distance), not element by element.
    distance = sum((w1[k] - w2[k]).abs().sum() for k in w1) / sum(w1[k].abs().sum() for k in w1)
    assert distance < 0.02, distance

    # Checkpoints written by two processes resume (under two processes) to the same result.
    from t5qa.checkpoint import verify_checkpoint

    checkpoint = tmp_path / "two" / "checkpoints" / "step-3"
    assert verify_checkpoint(checkpoint) is None
    assert {p.name for p in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("last", "best"))
    _train([*base, "--output", str(resumed), "--train-batch-size", "4", "--resume"], processes=2)
    w3 = load_file(str(resumed / "last" / "model.safetensors"))
    assert all(torch.allclose(w2[k], w3[k], rtol=1e-5, atol=1e-6) for k in w2)


def test_two_processes_stream_like_one_with_the_same_effective_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The main process reads the stream; Accelerate's dispatcher gives each process its share of every global
    # micro-batch, so two processes x 4 train on the batches of one process x 8. 32 questions in buffers of 16:
    # 4 micro-batches of 8 a pass, so 6 steps go on into a second pass (without one process running out).
    base, run_summary = train_one_and_two(tiny_model_dir, tmp_path, "--streaming", "--shuffle-buffer", "16")
    assert run_summary["streaming"] is True and run_summary["processes"] == 2
    # Resumed under two processes from step 3 (mid-pass), the dispatcher skips exactly the consumed batches.
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("last", "best"))
    _train([*base, "--output", str(resumed), "--train-batch-size", "4", "--resume"], processes=2)
    w2, w3 = load_file(str(tmp_path / "two" / "last" / "model.safetensors")), \
        load_file(str(resumed / "last" / "model.safetensors"))
    assert all(torch.allclose(w2[k], w3[k], rtol=1e-5, atol=1e-6) for k in w2)
