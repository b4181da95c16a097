"""Training under faults: nothing is lost to a crash, and no partial checkpoint is ever loaded.

Each run is a real `t5qa train` subprocess on a tiny model. A small wrapper (written to the test's temporary
directory) installs fault-injection hooks before handing over to the CLI: at a chosen point (inside an
optimizer step, half-way through writing a checkpoint file, just before the checkpoint's atomic rename, half-way
through pruning an old checkpoint) it writes a sentinel file and sleeps; the test then SIGKILLs it, which is what
a power cut or the OOM killer does. The run is resumed with --resume, possibly killed again, and at the end its
weights must equal those of a run that was never interrupted.

CI runs the fixed kill points, one kill inside a seeded random micro-batch and one SIGKILL at a seeded random
time; for more random-time kills:
    T5QA_CRASH_ITERATIONS=20 .venv/bin/python -m pytest tests/test_crash_resume.py
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from t5qa.errors import T5QAError

pytestmark = [pytest.mark.slow]

CRASH_ITERATIONS = int(os.environ.get("T5QA_CRASH_ITERATIONS", "2"))
RUN_TIMEOUT_S = 300  # one training subprocess; they take seconds when the machine is idle

# 32 training examples in micro-batches of 8: 4 steps per epoch, 12 steps = 3 epochs; checkpoints every
# 3 steps (3, 6, 9; none at the final step, which writes last/), evaluation every 6 steps.
TRAIN_FLAGS = {
    "max_steps": 12, "save_every_steps": 3, "eval_every_steps": 6, "train_batch_size": 8,
    "learning_rate": 1e-3, "keep_checkpoints": 2, "log_every_steps": 3, "seed": 7,
}

WRAPPER = textwrap.dedent('''
    """Run `t5qa train` with a fault-injection hook (tests/test_crash_resume.py writes this file)."""
    import json, os, sys, time
    from pathlib import Path

    HOOK = os.environ.get("T5QA_TEST_HOOK", "")
    SENTINEL = Path(os.environ["T5QA_TEST_SENTINEL"])
    LOADED = Path(os.environ["T5QA_TEST_LOADED"])
    name, _, at = HOOK.partition(":")
    at = int(at or 0)


    def freeze(what):
        """Tell the test where we are, then wait for its SIGKILL."""
        SENTINEL.write_text(json.dumps({"pid": os.getpid(), "at": what}))
        time.sleep(3600)


    import torch
    import t5qa.checkpoint as checkpoint
    import t5qa.train as train

    # Record every checkpoint the trainer loads, and whether it was intact at that moment.
    _load_checkpoint = train.load_checkpoint
    def load_checkpoint(accelerator, path, **kwargs):
        with LOADED.open("a") as f:
            f.write(json.dumps({"path": str(path), "problem": checkpoint.verify_checkpoint(Path(path))}) + "\\n")
        return _load_checkpoint(accelerator, path, **kwargs)
    train.load_checkpoint = load_checkpoint

    if name == "mid_step":  # after the forward pass of the at-th micro-batch of this process, before backward
        import accelerate
        _backward = accelerate.Accelerator.backward
        calls = [0]
        def backward(self, loss, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                freeze(f"micro-batch {at}")
            return _backward(self, loss, **kwargs)
        accelerate.Accelerator.backward = backward

    elif name == "sigterm_mid_step":  # SIGTERM (what `kill` and schedulers send) to ourselves mid-step
        import accelerate
        import signal
        _backward = accelerate.Accelerator.backward
        calls = [0]
        def backward(self, loss, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return _backward(self, loss, **kwargs)
        accelerate.Accelerator.backward = backward

    elif name == "partial_file":  # half of the scheduler file of checkpoint `at` written, no marker yet
        _save = torch.save
        def save(obj, f, *args, **kwargs):
            path = Path(f) if isinstance(f, (str, os.PathLike)) else None
            if path is not None and path.name == checkpoint.SCHEDULER_FILE and path.parent.name == f".tmp-step-{at}":
                _save(obj, f, *args, **kwargs)
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                freeze(f"half of {path}")
            return _save(obj, f, *args, **kwargs)
        torch.save = save

    elif name == "before_rename":  # checkpoint `at` complete with its marker, not yet renamed into place
        _replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if Path(src).name == f".tmp-step-{at}":
                freeze(f"before renaming {src}")
            return _replace(src, dst, *args, **kwargs)
        os.replace = replace

    elif name == "during_prune":  # pruning old checkpoints after checkpoint `at`: one file of one deleted
        import shutil
        _rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            path = Path(path)
            done = (path.parent / f"step-{at}" / checkpoint.CHECKPOINT_MARKER).is_file()
            if done and path.name.startswith("step-") and path.name != f"step-{at}":
                (path / "model.safetensors").unlink()
                freeze(f"pruning {path}")
            return _rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree

    elif name:
        raise SystemExit(f"unknown hook {HOOK}")

    from t5qa.cli import build_parser, main

    if "train" in build_parser()._subparsers._group_actions[0].choices:
        sys.exit(main(sys.argv[1:]))
    # Fallback while `t5qa train` is not registered: the same flags, straight to train.fit.
    import logging
    from t5qa.config import load_train_config
    from t5qa.errors import T5QAError
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = [a for a in sys.argv[1:] if a not in ("-q", "train")]
    values = {"resume": "--resume" in args}
    args = [a for a in args if a != "--resume"]
    for key, value in zip(args[::2], args[1::2]):
        values[key.lstrip("-").replace("-", "_")] = value
    try:
        train.fit(load_train_config(None, **values), progress=False)
    except T5QAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
''')


# --------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """The wrapper script, the data files and the tiny model shared by every run of this module."""
    from conftest import synthetic_copy_examples

    from t5qa.data import write_jsonl

    root = tmp_path_factory.mktemp("crash")
    write_jsonl(synthetic_copy_examples(32, seed=11), root / "train.jsonl")
    write_jsonl(synthetic_copy_examples(2, seed=12), root / "validation.jsonl")
    (root / "wrapper.py").write_text(WRAPPER, encoding="utf-8")
    return {"root": root, "wrapper": root / "wrapper.py", "model": tiny_model_dir,
            "train": root / "train.jsonl", "validation": root / "validation.jsonl"}


def _argv(ws: dict[str, Path], output: Path, *, resume: bool) -> list[str]:
    argv = ["-q", "train", "--model", str(ws["model"]), "--train", str(ws["train"]),
            "--validation", str(ws["validation"]), "--output", str(output)]
    for key, value in TRAIN_FLAGS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + (["--resume"] if resume else [])


def _env(output: Path, hook: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(T5QA_TEST_HOOK=hook, T5QA_TEST_SENTINEL=str(output.parent / f"{output.name}.sentinel"),
               T5QA_TEST_LOADED=str(output.parent / f"{output.name}.loaded.jsonl"))
    return env


def _start(ws: dict[str, Path], output: Path, *, resume: bool, hook: str = "") -> subprocess.Popen[str]:
    sentinel = output.parent / f"{output.name}.sentinel"
    sentinel.unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, str(ws["wrapper"]), *_argv(ws, output, resume=resume)],
                            env=_env(output, hook), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ws["root"]))


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"training did not finish in {RUN_TIMEOUT_S} s:\n{err[-3000:]}")
    return proc.returncode, err


def run_to_end(ws: dict[str, Path], output: Path, *, resume: bool) -> str:
    code, err = _finish(_start(ws, output, resume=resume))
    assert code == 0, f"t5qa train exited {code}:\n{err[-3000:]}"
    assert "Traceback" not in err
    return err


def run_and_kill_at(ws: dict[str, Path], output: Path, hook: str, *, resume: bool) -> dict[str, Any]:
    """Start a run with `hook`, SIGKILL it when the hook reports it got there; returns the sentinel."""
    sentinel = output.parent / f"{output.name}.sentinel"
    proc = _start(ws, output, resume=resume, hook=hook)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not sentinel.is_file():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"hook {hook} was never reached; the run exited {proc.returncode}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"hook {hook} not reached in {RUN_TIMEOUT_S} s")
        time.sleep(0.05)
    time.sleep(0.05)  # the sentinel is written just before the sleep
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(sentinel.read_text())


def final_weights(output: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(output / "last" / "model.safetensors"))


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), \
            f"{name} differs by {(a[name] - b[name]).abs().max().item():.3g}"


def loaded_checkpoints(output: Path) -> list[dict[str, Any]]:
    path = output.parent / f"{output.name}.loaded.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_only_intact_checkpoints_loaded(output: Path, expected_resumes: int) -> None:
    loaded = loaded_checkpoints(output)
    assert len(loaded) == expected_resumes, loaded
    for entry in loaded:
        assert entry["problem"] is None, f"a damaged checkpoint was loaded: {entry}"
        assert Path(entry["path"]).name.startswith("step-"), entry


@pytest.fixture(scope="module")
def baseline(workspace: dict[str, Path]) -> dict[str, Any]:
    """An uninterrupted run: the weights every interrupted-and-resumed run must end with."""
    output = workspace["root"] / "baseline"
    run_to_end(workspace, output, resume=False)
    steps = sorted(int(p.name.removeprefix("step-")) for p in (output / "checkpoints").glob("step-*"))
    assert steps == [6, 9], f"expected the two newest checkpoints kept, got {steps}"
    return {"output": output, "weights": final_weights(output)}


# --------------------------------------------------------------------------------------------------- tests


def test_killed_at_every_dangerous_point_then_resumed_equals_uninterrupted(
        workspace: dict[str, Path], baseline: dict[str, Any]) -> None:
    output = workspace["root"] / "chain"
    # Each link: (hook, whether this start resumes, the newest intact checkpoint the kill leaves behind).
    chain = [
        ("mid_step:5", False, 3),        # inside optimizer step 5 (micro-batch 5), checkpoint step-3 on disk
        ("partial_file:6", True, 3),     # checkpoint 6 half written: the temp dir has no marker
        ("before_rename:9", True, 6),    # checkpoint 9 complete in its temp dir, never renamed
        ("during_prune:9", True, 9),     # checkpoint 9 in place; old step-3 half deleted by the pruning
    ]
    from t5qa.checkpoint import verify_checkpoint

    for i, (hook, resume, newest_good) in enumerate(chain):
        where = run_and_kill_at(workspace, output, hook, resume=resume)
        good = [p for p in (output / "checkpoints").glob("step-*") if verify_checkpoint(p) is None]
        newest = max(int(p.name.removeprefix("step-")) for p in good)
        assert newest == newest_good, f"after the kill at {where['at']}: newest intact checkpoint {newest}"
        assert_only_intact_checkpoints_loaded(output, expected_resumes=sum(r for _, r, _ in chain[:i + 1]))
    err = run_to_end(workspace, output, resume=True)
    loaded = loaded_checkpoints(output)
    assert Path(loaded[-1]["path"]).name == "step-9", loaded[-1]
    assert_only_intact_checkpoints_loaded(output, expected_resumes=4)
    assert_same_weights(final_weights(output), baseline["weights"])
    # The resumed run finished cleanly, and its metrics log holds each logged step once, in order.
    assert "Traceback" not in err
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in metrics if row["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), f"duplicated or out-of-order metrics rows: {train_steps}"


def test_killed_at_random_points_then_resumed_equals_uninterrupted(
        workspace: dict[str, Path], baseline: dict[str, Any]) -> None:
    """The first kill lands inside a seeded random micro-batch after the first checkpoint (so a resume always
    happens); every further kill (T5QA_CRASH_ITERATIONS > 1) is a SIGKILL at a seeded random time."""
    rng = random.Random(1234)
    output = workspace["root"] / "random"
    first_micro_batch = rng.randint(4, 11)  # 4 micro-batches per epoch; checkpoint step-3 exists from 4 on
    run_and_kill_at(workspace, output, f"mid_step:{first_micro_batch}", resume=False)
    finished = False
    for iteration in range(1, CRASH_ITERATIONS):
        proc = _start(workspace, output, resume=True)
        # Wait until this start is training (metrics.jsonl grows), then kill after a random delay.
        metrics = output / "metrics.jsonl"
        start_size = metrics.stat().st_size if metrics.is_file() else 0
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and metrics.stat().st_size != start_size:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        code, err = _finish(proc)
        assert code in (0, -signal.SIGKILL), f"iteration {iteration}: exit {code}\n{err[-3000:]}"
        assert "Traceback" not in err
        if code == 0:
            finished = True  # it finished before the kill: nothing left to interrupt
            break
    if not finished:
        run_to_end(workspace, output, resume=True)
    loaded = loaded_checkpoints(output)
    assert loaded, "no run resumed from a checkpoint"
    assert_only_intact_checkpoints_loaded(output, expected_resumes=len(loaded))
    assert_same_weights(final_weights(output), baseline["weights"])


def test_sigterm_mid_step_saves_a_checkpoint_and_resume_equals_uninterrupted(
        workspace: dict[str, Path], baseline: dict[str, Any]) -> None:
    output = workspace["root"] / "sigterm"
    proc = _start(workspace, output, resume=False, hook="sigterm_mid_step:5")
    code, err = _finish(proc)
    assert code == 130, f"expected exit 130 after SIGTERM, got {code}:\n{err[-3000:]}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in err, err[-3000:]
    from t5qa.checkpoint import verify_checkpoint

    # The step in progress is finished and saved: no work is lost, not even the partial step.
    assert verify_checkpoint(output / "checkpoints" / "step-5") is None
    run_to_end(workspace, output, resume=True)
    assert [Path(e["path"]).name for e in loaded_checkpoints(output)] == ["step-5"]
    assert_same_weights(final_weights(output), baseline["weights"])


# -------------------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])


def _flip_bytes(path: Path) -> None:
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    for offset in (len(data) // 2, len(data) - 5):
        data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def _flip_optimizer_byte(path: Path) -> None:
    file = path / "optimizer.bin"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _delete_marker(path: Path) -> None:
    from t5qa.checkpoint import CHECKPOINT_MARKER

    (path / CHECKPOINT_MARKER).unlink()


def _garbage_marker(path: Path) -> None:
    from t5qa.checkpoint import CHECKPOINT_MARKER

    (path / CHECKPOINT_MARKER).write_text('{"step": 9, "sha256": ')


def _delete_state(path: Path) -> None:
    from t5qa.checkpoint import TRAINER_STATE_FILE

    (path / TRAINER_STATE_FILE).unlink()


DAMAGE = {"truncated_weights": _truncate, "flipped_weight_bytes": _flip_bytes,
          "flipped_optimizer_byte": _flip_optimizer_byte, "deleted_marker": _delete_marker,
          "garbage_marker": _garbage_marker, "deleted_trainer_state": _delete_state}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_detected_and_skipped(tmp_path: Path, baseline: dict[str, Any], damage: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from t5qa.checkpoint import latest_good_checkpoint, verify_checkpoint

    output = tmp_path / "run"
    shutil.copytree(baseline["output"], output)
    newest = output / "checkpoints" / "step-9"
    assert verify_checkpoint(newest) is None
    DAMAGE[damage](newest)
    problem = verify_checkpoint(newest)
    assert problem, f"{damage} went unnoticed"
    with caplog.at_level("WARNING", logger="t5qa.train"):
        chosen = latest_good_checkpoint(output)
    assert chosen.name == "step-6"
    assert any("step-9" in r.getMessage() and problem in r.getMessage() for r in caplog.records), \
        "the skipped checkpoint and why were not reported"


def test_resume_skips_a_corrupted_newest_checkpoint(workspace: dict[str, Path], baseline: dict[str, Any]) -> None:
    output = workspace["root"] / "corrupted"
    shutil.copytree(baseline["output"], output)
    for name in ("last", "best"):
        shutil.rmtree(output / name)
    _flip_bytes(output / "checkpoints" / "step-9")
    err = run_to_end(workspace, output, resume=True)
    loaded = loaded_checkpoints(output)
    assert [Path(e["path"]).name for e in loaded] == ["step-6"], loaded
    assert "step-9" in err and "checksum" in err, f"the skipped checkpoint was not reported:\n{err[-2000:]}"
    assert_same_weights(final_weights(output), baseline["weights"])


def test_resume_with_only_damaged_checkpoints_is_a_clear_error(workspace: dict[str, Path],
                                                               baseline: dict[str, Any]) -> None:
    output = workspace["root"] / "all_damaged"
    shutil.copytree(baseline["output"], output)
    for path in (output / "checkpoints").glob("step-*"):
        _truncate(path)
    code, err = _finish(_start(workspace, output, resume=True))
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "no complete checkpoint" in lines[0] and "Traceback" not in err, err[-2000:]


# ------------------------------------------------------------------------------------------------- disk full


def _disk_full_config(workspace: dict[str, Path], output: Path) -> Any:
    from t5qa.config import load_train_config

    flags = dict(TRAIN_FLAGS, max_steps=9, eval_every_steps=None)
    return load_train_config(None, model=str(workspace["model"]), train=str(workspace["train"]),
                             validation=str(workspace["validation"]), output=str(output), **flags)


@pytest.mark.parametrize("where", ["checkpoint", "final_model"])
def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
        workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The disk fills half-way through checkpoint step-6 (in accelerate's torch.save of the optimizer), or
    while writing last/ at the end (in the safetensors write): a one-line error that says so, and the
    previous checkpoint stays intact for --resume."""
    import torch
    import transformers.modeling_utils

    from t5qa import checkpoint, train
    from t5qa.errors import CheckpointError, TrainingError

    output = tmp_path / "full"

    def disk_full(path: Any) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "checkpoint":
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == ".tmp-step-6":
                raise disk_full(f)
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        good = output / "checkpoints" / "step-3"
    else:
        real_safe_save = transformers.modeling_utils.safe_save_file

        def safe_save(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(filename).parent.name.startswith(".last.tmp"):
                raise disk_full(filename)
            return real_safe_save(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safe_save)
        good = output / "checkpoints" / "step-6"
    with pytest.raises(T5QAError) as info:
        train.fit(_disk_full_config(workspace, output), progress=False)
    assert isinstance(info.value, (CheckpointError, TrainingError))
    message = str(info.value)
    assert "\n" not in message
    assert "disk" in message.lower() and ("full" in message.lower() or "space" in message.lower()), message
    assert checkpoint.verify_checkpoint(good) is None
    # The intact previous checkpoint is what a resume would load.
    assert checkpoint.latest_good_checkpoint(output) == good
    # Half-written temporary directories are removed: on a full disk, their space is what the user needs back.
    leftovers = [p.name for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in output.iterdir() if p.name.startswith(".last")]
    assert leftovers == []
    if where == "checkpoint":
        assert not (output / "checkpoints" / "step-6").exists()
