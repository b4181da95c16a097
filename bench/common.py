"""What every benchmark worker shares: the setting, the data, the model, timing and the result file.

The setting (issue 5): the t5-small architecture, randomly initialised, with the real T5 tokenizer; TyDi QA
gold passages (English); fp32; 2 threads; batch 8; source limit 384 tokens, target limit 30; prompts
`question: ... context: ...`; greedy prediction of exactly 16 new tokens.

Each worker runs in its own process (so peak RSS is its own) and writes one JSON result file that
`bench/run.py` collects. This module must import neither t5qa nor anything heavy at import time: peers use
only the libraries their users use.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "t5-small-tokenizer"
TRAIN_FILE = SHARED_DATA / "tydiqa_goldp_en" / "english_tydiqa_train.json"
DEV_FILE = SHARED_DATA / "tydiqa_goldp_en" / "english_tydiqa_dev.json"

THREADS = 2
BATCH_SIZE = 8
MAX_SOURCE_TOKENS = 384
MAX_TARGET_TOKENS = 30
NEW_TOKENS = 16
LEARNING_RATE = 3e-4
PROMPT = "question: {question} context: {context}"


def shared_data_missing() -> str | None:
    """A one-line reason when the benchmark data is absent (on a user's machine), else None."""
    for path in (TOKENIZER_DIR, TRAIN_FILE, DEV_FILE):
        if not path.exists():
            return f"{path} is absent: the benchmark needs ../shared/data (see its README.md)"
    return None


def set_threads() -> None:
    """Pin torch to the benchmark's thread count (call before any torch work)."""
    import torch

    torch.set_num_threads(THREADS)


def start_t5qa_experiment() -> Any:
    """The start of a bench/experiments script that trains t5qa in its own process: exit with a one-line reason
    when the shared data is absent, pin the threads, quiet logging, and keep freed memory as fit() does.
    Returns the entered keep_freed_memory block; hold on to it for the life of the process."""
    missing = shared_data_missing()
    if missing:
        sys.exit(f"skipped: {missing}")
    set_threads()
    import atexit
    import logging

    from t5qa.fastpath.allocator import keep_freed_memory  # here, not at import: peers' benchmarks import this module

    logging.basicConfig(level=logging.WARNING)
    keeping = keep_freed_memory()
    keeping.__enter__()
    # leave the block before interpreter shutdown clears module globals (else its clean-up fails noisily)
    atexit.register(keeping.__exit__, None, None, None)
    return keeping


def answering_experiment_args(doc: str, **extra: dict[str, Any]) -> Any:
    """The start of a bench/experiments script that answers dev questions: its arguments (--model-dir,
    --questions, --rounds, and `extra` flag name -> add_argument keywords), after exiting with a one-line reason
    when the shared data is absent and pinning the threads."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a saved t5-small (bench/make_model.py)")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    for flag, keywords in extra.items():
        parser.add_argument(flag, **keywords)
    args = parser.parse_args()
    missing = shared_data_missing()
    if missing:
        sys.exit(f"skipped: {missing}")
    set_threads()
    return args


@dataclass(frozen=True)
class QA:
    id: str
    question: str
    context: str
    answer: str


def read_squad(path: Path) -> list[QA]:
    """SQuAD v1.1 nested JSON -> one record per question, in file order, first answer as the target."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append(QA(qa["id"], qa["question"], paragraph["context"], qa["answers"][0]["text"]))
    return rows


def write_squad_subset(source: Path, ids: set[str], path: Path) -> Path:
    """The questions of SQuAD JSON file `source` whose ids are in `ids`, written to `path` in the same format
    (articles and paragraphs left without a question dropped)."""
    data = json.loads(source.read_text(encoding="utf-8"))
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if qa["id"] in ids]
        article["paragraphs"] = [p for p in article["paragraphs"] if p["qas"]]
    data["data"] = [a for a in data["data"] if a["paragraphs"]]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def prompt(row: QA) -> str:
    # run_seq2seq_qa.py builds " ".join(["question:", q.lstrip(), "context:", c.lstrip()]): the same string.
    return PROMPT.format(question=row.question.lstrip(), context=row.context.lstrip())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class TokenCounter:
    """Counts the real (non-padding) tokens of every forward call of a seq2seq model, per call.

    Installed on the model class, so it sees calls made inside any training loop (Trainer, Accelerate, t5qa)
    without touching that loop. Each call appends a list of (source_tokens, target_tokens) per row.
    """

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        self.paused = False  # forward calls that are not training steps (t5qa's fast-path proof) are not counted
        self._original: Any = None
        self._cls: Any = None

    def install(self, cls: Any) -> "TokenCounter":
        import torch

        original = cls.forward
        counter = self

        @functools.wraps(original)  # keeps the signature: Trainer inspects it to pick dataset columns
        def forward(model_self: Any, *args: Any, **kwargs: Any) -> Any:
            mask = kwargs.get("attention_mask")
            labels = kwargs.get("labels")
            if model_self.training and not counter.paused and mask is not None and labels is not None:
                with torch.no_grad():
                    src = mask.sum(dim=1).tolist()  # (batch,) real source tokens
                    tgt = (labels != -100).sum(dim=1).tolist()  # (batch,) real target tokens
                counter.calls.append(list(zip(src, tgt)))
            return original(model_self, *args, **kwargs)

        self._original, self._cls = original, cls
        cls.forward = forward
        return self

    def uninstall(self) -> None:
        """Restore the model class's own forward."""
        if self._cls is not None:
            self._cls.forward = self._original
            self._cls = None


class StepTimer:
    """Wall-clock and CPU time at the end of each optimizer step; throughput over steps after the warm-up."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def mark(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())  # user + system time of all this process's threads

    def window(self, warmup_steps: int) -> tuple[int, float, float]:
        """(timed steps, wall seconds, CPU seconds) from the end of step `warmup_steps` to the last step."""
        timed = len(self.ends) - warmup_steps
        if timed < 1 or warmup_steps < 1:
            raise RuntimeError(f"{len(self.ends)} steps ran; need at least 1 warm-up step and 1 timed step")
        return (timed, self.ends[-1] - self.ends[warmup_steps - 1],
                self.cpu_ends[-1] - self.cpu_ends[warmup_steps - 1])


def train_result(
    name: str,
    *,
    timer: StepTimer,
    counter: TokenCounter,
    warmup_steps: int,
    model_config: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Samples/s, real tokens/s and achieved (useful) FLOP/s of the timed steps of a training run."""
    from flops import train_flops

    timed_steps, seconds, cpu_seconds = timer.window(warmup_steps)
    # One forward per optimizer step (no accumulation in this setting): calls[i] is step i's batch.
    calls = counter.calls[warmup_steps:warmup_steps + timed_steps]
    if len(calls) != timed_steps:
        raise RuntimeError(f"{name}: saw {len(counter.calls)} forward calls for {len(timer.ends)} steps")
    rows = [row for call in calls for row in call]
    samples = len(rows)
    flop = sum(train_flops(model_config, s, t) for s, t in rows)
    result = {
        "name": name,
        "kind": "train",
        "timed_steps": timed_steps,
        "warmup_steps": warmup_steps,
        "seconds": seconds,
        "samples": samples,
        "samples_per_second": samples / seconds,
        "real_source_tokens_per_example": sum(s for s, _ in rows) / samples,
        "real_target_tokens_per_example": sum(t for _, t in rows) / samples,
        "useful_flop_per_second": flop / seconds,
        # CPU seconds per wall second: about THREADS when the process had its cores, less when it was starved
        "cpu_per_wall": cpu_seconds / seconds,
        # the same rates per CPU-second: much less sensitive to other jobs taking the cores
        "cpu_seconds": cpu_seconds,
        "samples_per_cpu_second": samples / cpu_seconds,
        "useful_flop_per_cpu_second": flop / cpu_seconds,
    }
    result.update(extra or {})
    return result


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import ctranslate2

        out["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        out["ctranslate2"] = "not installed"
    return out


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Write a worker's result JSON, adding its peak RSS and command line."""
    result = dict(result)
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_average_at_end"] = os.getloadavg()[0]
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    Path(path).write_text(json.dumps(result, indent=2), encoding="utf-8")


