"""Answering in shards: over the processes of `accelerate launch` (or torchrun), resumable after a crash.

The questions are cut into shards of `shard_size` in input order; shard i belongs to process i % N. Each shard is
written to `OUTPUT.shards/shard-NNNNN.jsonl` (a temporary file, flushed to disk, then renamed) and only then
marked done by `shard-NNNNN.done`, which holds its row count and SHA-256. A shard is done only when its marker
exists and the file's rows and checksum match it, so a shard cut off by a crash, or changed on disk, is answered
again and nothing else is. `manifest.json` names the job (data, model, settings, shard size); shards of another
job are never mixed in: the run stops with one line that says what to do. When every shard is done, the main
process joins them into the one output, in input order, and removes the directory.

The processes are Accelerate's (`PartialState`): its rank, world size, device and barrier; no launcher of t5qa's
own. One process without a launcher is a world of one and resumes the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from t5qa.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000
MANIFEST = "manifest.json"


def shards_dir(output: str | os.PathLike) -> Path:
    """Where the shards of `output` are kept while the job runs: OUTPUT.shards/ next to it."""
    output = Path(output)
    return output.with_name(output.name + ".shards")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Processes:
    """This process's place among the launched ones (one process without a launcher)."""

    rank: int = 0
    world: int = 1
    device: Any = None
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait_for_everyone(self) -> None:
        if self._state is not None and self.world > 1:
            self._state.wait_for_everyone()


def processes() -> Processes:
    """Accelerate's view of the launched processes; a plain `python -m t5qa` is one process, with no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # ACCELERATE_USE_CPU: processes on CPUs (`accelerate launch --multi_cpu`, or torchrun with it set), as the
    # Accelerator of training reads it.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return Processes(rank=state.process_index, world=state.num_processes, device=state.device, _state=state)


class ShardedJob:
    """The shards of one job in `directory`: which are done, which are this process's, writing and joining them."""

    def __init__(self, directory: Path, *, total: int, shard_size: int, fingerprint: dict[str, Any],
                 procs: Processes) -> None:
        if shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
        self.directory = directory
        self.total = total
        self.shard_size = shard_size
        self.count = max(1, -(-total // shard_size))
        self.fingerprint = {**fingerprint, "questions": total, "shard_size": shard_size}
        self.procs = procs

    # -------------------------------------------------------------------------------------------- the job

    def open(self) -> None:
        """Create the directory and its manifest (main process), or check that the one there is this job's.

        Raises:
            ConfigError: the directory holds the shards of another job (other data, model or settings).
        """
        path = self.directory / MANIFEST
        if self.procs.is_main:
            if path.is_file():
                self._check_manifest(path)
            else:
                try:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    _write_atomic(path, json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")
                except OSError as exc:
                    raise DataError(f"{self.directory}: cannot write the shards ({exc.strerror}); check --output "
                                    f"and its directory") from None
        self.procs.wait_for_everyone()
        self._check_manifest(path)

    def _check_manifest(self, path: Path) -> None:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        want = json.loads(json.dumps(self.fingerprint, sort_keys=True))  # as it reads back from the file
        if found != want:
            differs = sorted(k for k in want if not isinstance(found, dict) or found.get(k) != want[k])
            raise ConfigError(f"{self.directory}: holds the shards of another job (its "
                              f"{', '.join(differs) or 'manifest'} differ); delete {self.directory} to start "
                              f"over, or choose another --output")

    def span(self, index: int) -> tuple[int, int]:
        """The question indices [start, end) of shard `index`."""
        start = index * self.shard_size
        return start, min(self.total, start + self.shard_size)

    def mine(self) -> list[int]:
        """This process's shards that are not done yet, in order."""
        return [i for i in range(self.procs.rank, self.count, self.procs.world) if not self.is_done(i)]

    def done_count(self) -> int:
        return sum(self.is_done(i) for i in range(self.count))

    # ------------------------------------------------------------------------------------------ one shard

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.directory / f"shard-{index:05d}"
        return stem.with_suffix(".jsonl"), stem.with_suffix(".done")

    def is_done(self, index: int) -> bool:
        """Done: its marker exists, and the file has the rows and the checksum the marker records."""
        rows_path, marker = self._paths(index)
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            start, end = self.span(index)
            return (record.get("rows") == end - start and rows_path.is_file()
                    and record.get("sha256") == file_sha256(rows_path))
        except (OSError, ValueError, AttributeError):
            return False

    def write(self, index: int, rows: list[dict[str, Any]], totals: dict[str, float] | None = None) -> None:
        """Write shard `index` (its rows in question order), then its done marker; each atomically."""
        start, end = self.span(index)
        if len(rows) != end - start:  # an internal invariant: one row per question
            raise AssertionError(f"shard {index}: {len(rows)} rows for {end - start} questions")
        rows_path, marker = self._paths(index)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        try:
            _write_atomic(rows_path, text)
            _write_atomic(marker, json.dumps({"rows": len(rows), "sha256": file_sha256(rows_path),
                                              "totals": totals or {}}) + "\n")
        except OSError as exc:
            raise DataError(f"{rows_path}: cannot write the shard ({exc.strerror}); the shards done so far are "
                            f"kept, run the same command again to resume") from None

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every shard's rows, in question order (every shard must be done)."""
        for index in range(self.count):
            rows_path, _ = self._paths(index)
            with rows_path.open(encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)

    def totals(self) -> list[dict[str, float]]:
        """The `totals` each shard recorded (sums to combine, such as evaluation's loss), in shard order."""
        return [json.loads(self._paths(i)[1].read_text(encoding="utf-8")).get("totals", {})
                for i in range(self.count)]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def run_shards(job: ShardedJob, work: Callable[[int, int], tuple[list[dict[str, Any]], dict[str, float]]], *,
               on_shard: Callable[[int], None] | None = None) -> int:
    """Answer this process's unfinished shards with `work(start, end) -> (rows, totals)`, then wait for every
    process. Returns how many shards this process answered; afterwards every shard is done (the main process
    checks, and raises if one is not)."""
    job.open()
    already = job.done_count() if job.procs.is_main else 0
    todo = job.mine()
    if job.procs.is_main and already:
        logger.info("%s: %d of %d shards already done; answering the other %d", job.directory, already, job.count,
                    job.count - already)
    for index in todo:
        start, end = job.span(index)
        rows, totals = work(start, end)
        job.write(index, rows, totals)
        if on_shard is not None:
            on_shard(end - start)
    job.procs.wait_for_everyone()
    if not job.procs.is_main:
        return len(todo)  # the main process checks and joins the shards (and then removes them)
    missing = [i for i in range(job.count) if not job.is_done(i)]
    if missing:
        raise DataError(f"{job.directory}: shard(s) {', '.join(map(str, missing[:10]))} are not done (a process "
                        f"failed?); run the same command again to answer them")
    return len(todo)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
