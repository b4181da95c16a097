"""The run directory: its file names and its metrics log. `train` writes them; `report`, `tune` and the CLI read them.

    config.yaml           the resolved TrainConfig
    run_summary.json      what the run is about to do (written before step one)
    metrics.jsonl         one JSON object per log/evaluation: {"step", "epoch", "split", "loss", ...}
    tensorboard/PROJECT/  the same numbers for TensorBoard (--report-to; the trackers are t5qa.tracking's)
    trackers.json         the experiment trackers' run ids, for resume
    checkpoints/step-N/   resumable state (see `t5qa.checkpoint`)
    best/, last/          Hugging Face layout models (loadable by transformers alone) with t5qa.json
    eval_predictions.jsonl, summary.json, loss.png, learning_rate.png, em_f1.png, report.md
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_SUMMARY_FILE = "run_summary.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "eval_predictions.jsonl"
PLOT_FILES = ("loss.png", "learning_rate.png", "em_f1.png")
BREAKDOWN_PLOT = "em_f1_breakdown.png"  # the best evaluation's EM/F1 by kind of example (analysis.py)
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
LAST_DIR = "last"
MODEL_META_FILE = "t5qa.json"
"""Written into every model directory t5qa saves: prompt, window and answer-length settings, the train config."""


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON (values JSON cannot hold are written as their str())."""
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


class MetricsLog:
    """metrics.jsonl, main process only; each row also goes to `also` (the experiment trackers).

    On resume, rows after the checkpoint are dropped.
    """

    def __init__(self, output_dir: Path, *, resume_step: int | None, enabled: bool,
                 also: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.enabled = enabled
        self.also = also
        self.handle = None
        if not enabled:
            return
        path = output_dir / METRICS_FILE
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a half-written last line of a killed run
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    kept.append(line)
        self.handle = path.open("w", encoding="utf-8")
        for line in kept:
            self.handle.write(line + "\n")
        self.handle.flush()

    def write(self, row: dict[str, Any]) -> None:
        """Append one row ({"step", "epoch", "split", numbers...}) to metrics.jsonl, and give it to `also`."""
        if not self.enabled or self.handle is None:
            return
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        if self.also is not None:
            self.also(row)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def read_jsonl_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(the JSON objects of a JSON-lines file, one problem line per skipped line); an absent file gives ([], [])."""
    if not path.is_file():
        return [], []
    rows, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        problem = f"{path}: unreadable ({exc})"
        logger.warning(problem)
        return [], [problem]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            problems.append(f"{path.name} line {number}: not a JSON object, skipped")
            continue
        rows.append(row)
    for problem in problems:
        logger.warning("%s", problem)
    return rows, problems


def by_split(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Metrics rows as {"train": [...], "validation": [...]}, each sorted by step, a repeated step's last row kept."""
    splits: dict[str, dict[float, dict[str, Any]]] = {"train": {}, "validation": {}}
    for row in rows:
        split = row.get("split", "train")
        step = row.get("step")
        if (split in splits and isinstance(step, (int, float)) and not isinstance(step, bool)
                and math.isfinite(step)):
            splits[split][step] = row
    return {split: [steps[s] for s in sorted(steps)] for split, steps in splits.items()}


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read a metrics.jsonl file into {"train": [...], "validation": [...]}, each sorted by step.

    A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its last record.
    Unparsable lines (such as a line cut off by a crash) are skipped with a warning.

    Args:
        path: the metrics.jsonl file.
    Returns:
        Records per split; an absent file gives empty lists.
    """
    rows, _ = read_jsonl_rows(Path(path))
    return by_split(rows)
