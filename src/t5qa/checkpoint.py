"""Checkpoints: atomic save, verification by checksums, loading, and the random state, for an exact resume.

A checkpoint is `checkpoints/step-N/` in the run directory: Accelerate's state (model, optimizer), the scheduler,
each process's random state, the trainer's own state (a JSON dict the caller owns) and the config. It is written
into `.tmp-step-N`, checksummed into `checkpoint_complete.json` (written last), fsynced, and renamed into place,
so a crash at any moment leaves either the previous checkpoints or the new one complete. Functions take explicit
arguments (an Accelerator, a directory, a scheduler), not a training run, so they can be tested and reused alone.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t5qa.config import TrainConfig, load_yaml, save_yaml, to_dict
from t5qa.errors import CheckpointError, ConfigError
from t5qa.rundir import CHECKPOINTS_DIR, CONFIG_FILE, write_json

logger = logging.getLogger(__name__)


class _TiedWeightsNote(logging.Filter):
    """Drops Accelerate's "Removed shared tensor {...} while saving ... check that you don't receive any warning
    while reloading" on every checkpoint: those are a T5's tied embeddings and output layer, saved once and tied
    again on load (tests/test_resume.py resumes bit for bit from such checkpoints). Other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()

CHECKPOINT_MARKER = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete
TRAINER_STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(handle.fileno())  # the bytes we hash are the bytes on disk
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's and (where present) CUDA's random state."""
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_error(output_dir: Path, exc: OSError, what: str) -> CheckpointError:
    """A one-line error for a failed write of `what`, saying what is still intact and how to continue."""
    good = complete_checkpoints(output_dir)
    kept = f"the last good checkpoint {good[0]} is intact" if good else "no checkpoint had been written yet"
    reason = ("the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
              else exc.strerror or type(exc).__name__)
    return CheckpointError(f"cannot write {what} ({exc.filename}): {reason}; {kept}. Free some space (or use "
                           f"--output on another disk) and continue with --resume")


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, *, scheduler: Any, trainer_state: dict[str, Any],
                    config: TrainConfig, keep: int) -> Path:
    """Write checkpoints/step-`step` atomically and keep the newest `keep` checkpoints; returns its path.

    Every process calls it (Accelerate's save_state gathers sharded state). A failed write (e.g. a full disk)
    leaves no temporary directory behind.

    Raises:
        CheckpointError: the write failed; the message says which checkpoint is still intact.
    """
    root = output_dir / CHECKPOINTS_DIR
    tmp = root / f".tmp-step-{step}"
    try:
        return _save(accelerator, root, step, scheduler, trainer_state, config, keep)
    except OSError as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(output_dir, exc, f"checkpoint step-{step}") from None


def _save(accelerator: Any, root: Path, step: int, scheduler: Any, trainer_state: dict[str, Any],
          config: TrainConfig, keep: int) -> Path:
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    note, accelerate_logger = _TiedWeightsNote(), logging.getLogger("accelerate.utils.other")
    accelerate_logger.addFilter(note)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)  # model, optimizer (FSDP/DeepSpeed aware)
    finally:
        accelerate_logger.removeFilter(note)
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        save_yaml(dataclasses.replace(config, resume=False), tmp / CONFIG_FILE)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        checksums = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        write_json(tmp / CHECKPOINT_MARKER, {"step": step, "sha256": checksums})
        with (tmp / CHECKPOINT_MARKER).open("rb") as handle:
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a stale or corrupted checkpoint of the same step, from before a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root.parent)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """checkpoints/step-N directories, newest (highest N) first."""
    found = []
    for path in (output_dir / CHECKPOINTS_DIR).glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found, reverse=True)]


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used, or None when it is complete and intact."""
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"no {CHECKPOINT_MARKER} (the write did not finish)"
    try:
        expected = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable {CHECKPOINT_MARKER} ({exc})"
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum (corrupted)"
    return None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose write finished (marker present), newest first; not verified against their checksums."""
    return [p for p in checkpoint_dirs(output_dir) if (p / CHECKPOINT_MARKER).is_file()]


def latest_good_checkpoint(output_dir: Path) -> Path:
    """The newest checkpoint that passes `verify_checkpoint`, warning about each newer one that does not.

    Raises:
        CheckpointError: none is usable.
    """
    for path in checkpoint_dirs(output_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s cannot be used: %s; trying the previous one", path, problem)
    raise CheckpointError(
        f"{output_dir / CHECKPOINTS_DIR}: no complete checkpoint to resume from (all are incomplete or "
        f"corrupted); run again without --resume and with a new --output"
    )


def check_output_dir(output_dir: Path, *, resume: bool) -> None:
    """Refuse to start over a run's checkpoints without --resume, and --resume without a checkpoint.

    Raises:
        ConfigError: with the fix.
    """
    has_checkpoints = any((output_dir / CHECKPOINTS_DIR).glob("step-*"))
    if has_checkpoints and not resume:
        raise ConfigError(
            f"{output_dir} already holds checkpoints of a run: pass --resume to continue it, "
            f"or choose another --output (or delete {output_dir / CHECKPOINTS_DIR}) to start over"
        )
    if resume and not has_checkpoints:
        raise ConfigError(f"--resume: {output_dir / CHECKPOINTS_DIR} holds no checkpoint; run without --resume")


def load_checkpoint(accelerator: Any, path: Path, *, scheduler: Any, config: TrainConfig) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's random state from `path`; returns the trainer state.

    Warns when `config` differs from the checkpoint's (the result will then differ from an uninterrupted run).
    """
    saved = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    _warn_config_changes(config, path)
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s: no random state for process %d (the number of processes changed); dropout will not "
                       "repeat the interrupted run exactly", path, accelerator.process_index)
    return saved


def _warn_config_changes(cfg: TrainConfig, path: Path) -> None:
    try:
        before = load_yaml(path / CONFIG_FILE)
    except ConfigError:
        return
    now = to_dict(dataclasses.replace(cfg, resume=False))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        logger.warning("resuming with changed settings (%s): the result will differ from an uninterrupted run",
                       ", ".join(changed))
