"""Plots (PNG) and the run report (Markdown or self-contained HTML) of a training run directory.

A run directory, as `t5qa train` writes it, holds:
- `metrics.jsonl`: one JSON object per line, {"step", "epoch", "split": "train" | "validation", "loss",
  "learning_rate", "exact_match", "f1", "token_accuracy", "samples_per_second", ...}, keys present as known;
- `config.yaml`: the resolved TrainConfig;
- optionally `summary.json` (final metrics, best step and metric, steps, stopped_early, train seconds) and
  `eval_predictions.jsonl` (id, question, prediction, references, exact_match, f1, answer_in_input).

Everything here tolerates missing or partly written files (a report of a crashed or running job is still
useful): what is absent is skipped, logged and said in the report.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t5qa.config import REPORT_FORMATS
from t5qa.errors import ConfigError, DataError
from t5qa.rundir import (BREAKDOWN_PLOT, CONFIG_FILE, METRICS_FILE, PLOT_FILES, PREDICTIONS_FILE, SUMMARY_FILE,
                         by_split, read_jsonl_rows, read_metrics)

logger = logging.getLogger(__name__)


# Settings a reader looks for first, in this order; the rest of the config follows in file order.
_KEY_SETTINGS = (
    "model", "train", "validation", "output", "epochs", "max_steps", "train_batch_size",
    "gradient_accumulation_steps", "generate.batch_size", "learning_rate", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "optimizer", "weight_decay", "precision", "seed", "encode.max_source_tokens",
    "encode.max_target_tokens", "metric_for_best", "lora_rank",
)
_SAMPLES = 5
_MAX_CELL_CHARS = 300  # long questions/answers are cut so the tables stay readable


# --- reading -----------------------------------------------------------------------------------------------

@dataclass
class _Run:
    directory: Path
    train: list[dict[str, Any]] = field(default_factory=list)        # sorted by step, one row per step
    validation: list[dict[str, Any]] = field(default_factory=list)
    has_metrics_file: bool = False
    config: dict[str, Any] = field(default_factory=dict)             # flattened: "encode.max_source_tokens"
    summary: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)                # unreadable files or lines, for the report


def _read_run(run_dir: Path) -> _Run:
    run = _Run(directory=run_dir)
    metrics_path = run_dir / METRICS_FILE
    run.has_metrics_file = metrics_path.is_file()
    rows, run.problems = read_jsonl_rows(metrics_path)
    splits = by_split(rows)
    run.train, run.validation = splits["train"], splits["validation"]

    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
            loaded = None
            run.problems.append(f"{CONFIG_FILE}: unreadable ({type(exc).__name__})")
            logger.warning("%s: unreadable (%s)", config_path, exc)
        if isinstance(loaded, dict):
            run.config = _flatten(loaded)
        elif loaded is not None:
            run.problems.append(f"{CONFIG_FILE}: not a mapping of settings")

    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        try:
            loaded = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            loaded = None
            run.problems.append(f"{SUMMARY_FILE}: unreadable ({type(exc).__name__})")
            logger.warning("%s: unreadable (%s)", summary_path, exc)
        if isinstance(loaded, dict):
            run.summary = loaded

    run.predictions, problems = read_jsonl_rows(run_dir / PREDICTIONS_FILE)
    run.problems.extend(problems)
    return run


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _number(value: Any) -> float | None:
    """A finite float, or None for absent, non-numeric, NaN or infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = _number(row.get(key))
        if value is not None:
            steps.append(float(row["step"]))
            values.append(value)
    return steps, values


# --- plots -------------------------------------------------------------------------------------------------

def make_plots(run_dir: str | Path) -> list[Path]:
    """Draw loss.png, learning_rate.png and em_f1.png into the run directory from its metrics.jsonl.

    A plot whose data is absent (for example em_f1.png when no evaluation ran) is skipped and the reason
    logged; a missing or empty metrics.jsonl gives no plots.

    Args:
        run_dir: the run directory.
    Returns:
        The paths of the PNG files written.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        logger.warning("%s not found: no plots drawn", metrics_path)
        return []
    loss_plot, lr_plot, em_f1_plot = PLOT_FILES
    splits = read_metrics(metrics_path)
    train, validation = splits["train"], splits["validation"]

    plans: list[tuple[str, str, str, list[tuple[str, tuple[list[float], list[float]]]]]] = [
        (loss_plot, "Loss", "loss",
         [("train", _series(train, "loss")), ("validation", _series(validation, "loss"))]),
        (lr_plot, "Learning rate", "learning rate", [("learning rate", _series(train, "learning_rate"))]),
        (em_f1_plot, "Validation exact match and F1", "score (%)",
         [("exact match", _series(validation, "exact_match")), ("F1", _series(validation, "f1"))]),
    ]
    written = []
    for filename, title, ylabel, lines in plans:
        present = [(label, xy) for label, xy in lines if xy[0]]
        if not present:
            logger.info("%s skipped: %s has no values for it", filename, metrics_path)
            continue
        path = run_dir / filename
        _plot(path, title, ylabel, present)
        written.append(path)
    return written


def _plot(path: Path, title: str, ylabel: str, lines: list[tuple[str, tuple[list[float], list[float]]]]) -> None:
    # A bare Figure on the Agg canvas: no pyplot global state and no change to the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (steps, values) in lines:
        # Markers make a single evaluation point visible; long training curves stay plain lines.
        ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


# --- the report --------------------------------------------------------------------------------------------

# The report is built once as a list of blocks, then rendered to Markdown or HTML:
# ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", path, alt).
_Block = tuple[Any, ...]


def write_report(run_dir: str | Path, fmt: str = "md") -> Path:
    """Write report.md or report.html into the run directory (redrawing the plots first).

    The report holds the resolved config (key settings first), the final and best metrics, the plots
    (relative links in Markdown, embedded base64 images in HTML so the file stands alone), and up to 5
    right and 5 wrong answers (lowest F1 first) from eval_predictions.jsonl.

    Args:
        run_dir: the run directory (the `output` of `t5qa train`).
        fmt: "md" or "html".
    Returns:
        The path of the report.
    Raises:
        ConfigError: `fmt` is not md or html.
        DataError: `run_dir` is not a directory.
    """
    if fmt not in REPORT_FORMATS:
        raise ConfigError(f"--report-format must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found; pass the output directory of a `t5qa train` run")
    run = _read_run(run_dir)
    plots = make_plots(run_dir)
    blocks = _build(run, plots)
    if run.predictions:
        blocks.extend(_breakdown_blocks(run.predictions, run_dir / BREAKDOWN_PLOT))
    path = run_dir / f"report.{fmt}"
    text = _to_markdown(blocks) if fmt == "md" else _to_html(blocks)
    path.write_text(text, encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def _build(run: _Run, plots: list[Path]) -> list[_Block]:
    blocks: list[_Block] = [("h1", f"t5qa run report: {run.directory.resolve().name}")]
    if run.problems:
        blocks.append(("p", "Some files could not be fully read: " + "; ".join(run.problems[:5])))

    blocks.append(("h2", "Configuration"))
    if run.config:
        blocks.append(("table", ("setting", "value"), [(k, _value_text(v)) for k, v in _ordered_config(run.config)]))
    else:
        blocks.append(("p", f"No {CONFIG_FILE} in the run directory."))

    blocks.append(("h2", "Training"))
    blocks.append(("table", ("quantity", "value"), _training_rows(run)))

    blocks.append(("h2", "Metrics"))
    final = _final_metrics(run)
    if final:
        best = _best(run)
        headers = ("metric", "final") + (("best",) if best else ())
        rows = []
        for key, value in final.items():
            row = [key, _value_text(value)]
            if best:
                row.append(_value_text(best[1].get(key, "")))
            rows.append(tuple(row))
        blocks.append(("table", headers, rows))
        if best:
            step, _, metric = best
            blocks.append(("p", f"Best checkpoint: step {_value_text(step)} by {metric}."))
        chosen = (best[1] if best else final)
        if _number(chosen.get("no_answer_threshold")) is not None:
            changes = ", ".join(f"{label} {_value_text(chosen.get('model_' + key))} -> {_value_text(chosen.get(key))}"
                                for key, label in (("f1", "F1"), ("HasAns_f1", "HasAns F1"), ("NoAns_f1", "NoAns F1"))
                                if key in chosen and "model_" + key in chosen)
            blocks.append(("p", f"The validation set has unanswerable questions: each evaluation chose the no-answer "
                                f"threshold that maximises its F1 (noanswer.py), saved with the model and applied by "
                                f"predict and serve. Here {_value_text(chosen['no_answer_threshold'])}: {changes} "
                                "(the model's own answers -> with the threshold; chosen on this very set, so an "
                                "optimistic figure)."))
    else:
        blocks.append(("p", "No evaluation was run: metrics.jsonl has no validation lines and there is no "
                            "final evaluation in summary.json."))

    blocks.append(("h2", "Plots"))
    if plots:
        blocks.extend(("img", path, path.stem.replace("_", " ")) for path in plots)
    elif not run.has_metrics_file:
        blocks.append(("p", f"No plots: {METRICS_FILE} not found."))
    else:
        blocks.append(("p", f"No plots: {METRICS_FILE} has no values to draw."))

    blocks.extend(_sample_blocks(run.predictions))
    return blocks


def _breakdown_blocks(predictions: list[dict[str, Any]], plot_path: Path) -> list[_Block]:
    """EM and F1 of the best evaluation by kind of example (analysis.py): a bar chart and one table per
    dimension, each bucket with its worst example."""
    from t5qa.analysis import breakdown

    table = breakdown(predictions, worst=1)
    _plot_breakdown(plot_path, table)
    blocks: list[_Block] = [
        ("h2", "Error analysis"),
        ("p", f"Exact match and F1 of the {len(predictions)} evaluated questions ({PREDICTIONS_FILE}), by kind of "
              "example; each bucket's worst answer is shown (lowest F1)."),
        ("img", plot_path, "EM and F1 by kind of example"),
    ]
    for dimension, buckets in table.items():
        blocks.append(("h2", f"By {dimension}"))
        rows = []
        for b in buckets:
            worst = b["worst"][0] if b["worst"] else {}
            references = worst.get("references")
            reference = "; ".join(map(str, references)) if isinstance(references, list) and references else "(none)"
            predicted = _cut(str(worst.get("prediction") or "")) or "(empty)"
            example = (f"{_cut(str(worst.get('question', '')))} -> {predicted} (reference: {_cut(reference)})"
                       if worst else "")
            rows.append((b["bucket"], str(b["count"]), f"{b['exact_match']:.1f}", f"{b['f1']:.1f}", example))
        blocks.append(("table", (dimension, "questions", "EM", "F1", "worst answer"), rows))
    return blocks


def _plot_breakdown(path: Path, table: dict[str, list[dict[str, Any]]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 2
    rows = -(-len(table) // columns)
    cjk = _cjk_font()
    fig = Figure(figsize=(11.0, 2.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for index, (dimension, buckets) in enumerate(table.items()):
        ax = fig.add_subplot(rows, columns, index + 1)
        labels = [f"{_drawable(str(b['bucket']), cjk)} ({b['count']})" for b in buckets]
        positions = list(range(len(buckets)))
        ax.barh([p + 0.2 for p in positions], [b["f1"] for b in buckets], height=0.4, label="F1")
        ax.barh([p - 0.2 for p in positions], [b["exact_match"] for b in buckets], height=0.4, label="EM")
        ax.set_yticks(positions, labels, fontsize=8, **({"fontfamily": ["DejaVu Sans", cjk]} if cjk else {}))
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_title(f"by {dimension}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        if index == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


# Fonts with Chinese glyphs that Linux, macOS and Windows machines often have; matplotlib's own has none.
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "Droid Sans Fallback", "PingFang SC", "Heiti SC", "Microsoft YaHei", "SimHei")


def _cjk_font() -> str | None:
    """An installed font that draws Chinese, or None."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in _CJK_FONTS if name in installed), None)


def _drawable(label: str, cjk_font: str | None) -> str:
    """A bucket label the chart can draw: "what / 什么" keeps its Chinese only where a font draws it (the tables
    keep it always)."""
    if cjk_font is None and not label.isascii():
        return label.split(" / ")[0] if label.split(" / ")[0].isascii() else label.encode("ascii", "replace").decode()
    return label


def _ordered_config(config: dict[str, Any]) -> list[tuple[str, Any]]:
    first = [(key, config[key]) for key in _KEY_SETTINGS if key in config]
    return first + [(key, value) for key, value in config.items() if key not in _KEY_SETTINGS]


def _training_rows(run: _Run) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    summary = run.summary
    steps = summary.get("steps")
    if steps is None and (run.train or run.validation):
        steps = max(row["step"] for row in run.train + run.validation)
    rows.append(("optimizer steps", _value_text(steps) if steps is not None else "unknown"))
    last_train = next((row for row in reversed(run.train) if _number(row.get("loss")) is not None), None)
    if last_train:
        rows.append(("last training loss", f"{_value_text(last_train['loss'])} (step {last_train['step']})"))
    speeds = [v for v in (_number(row.get("samples_per_second")) for row in run.train) if v is not None]
    if speeds:
        rows.append(("mean samples per second", _value_text(sum(speeds) / len(speeds))))
    rows.append(("evaluations", str(len(run.validation))))
    for key, label in (("stopped_early", "stopped early"), ("train_seconds", "seconds in training steps"),
                       ("eval_seconds", "seconds in evaluation")):
        if key in summary:
            rows.append((label, _value_text(summary[key])))
    known = {"steps", "stopped_early", "train_seconds", "eval_seconds", "final_metrics", "best_step", "best_metric",
             "metric_for_best"}
    rows.extend((key, _value_text(value)) for key, value in summary.items()
                if key not in known and not isinstance(value, (dict, list)))
    return rows


def _metric_values(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("step", "epoch", "split") and not isinstance(v, (dict, list))}


def _final_metrics(run: _Run) -> dict[str, Any]:
    final = run.summary.get("final_metrics")
    if isinstance(final, dict) and final:
        return {k: v for k, v in final.items() if not isinstance(v, (dict, list))}
    if run.validation:
        return _metric_values(run.validation[-1])
    return {}


def _best(run: _Run) -> tuple[Any, dict[str, Any], str] | None:
    """(step, metrics at that step, metric name) of the best evaluation, or None when unknown."""
    metric = str(run.summary.get("metric_for_best") or run.config.get("metric_for_best") or "f1")
    best_step = run.summary.get("best_step")
    if best_step is not None:
        row = next((r for r in run.validation if r.get("step") == best_step), None)
        values = _metric_values(row) if row else {}
        if not values and _number(run.summary.get("best_metric")) is not None:
            values = {metric: run.summary["best_metric"]}
        return best_step, values, metric
    scored = [row for row in run.validation if _number(row.get(metric)) is not None]
    if not scored:
        return None
    sign = -1.0 if metric == "loss" else 1.0
    best = max(scored, key=lambda row: sign * row[metric])  # first of equals wins: the earliest checkpoint
    return best["step"], _metric_values(best), metric


def _sample_blocks(predictions: list[dict[str, Any]]) -> list[_Block]:
    if not predictions:
        return [("h2", "Sample answers"), ("p", f"No {PREDICTIONS_FILE} in the run directory.")]
    right = [row for row in predictions if (_number(row.get("exact_match")) or 0.0) > 0]
    wrong = [row for row in predictions if (_number(row.get("exact_match")) or 0.0) <= 0]
    wrong.sort(key=lambda row: _number(row.get("f1")) or 0.0)  # stable: file order among equal F1
    headers = ("id", "question", "prediction", "references", "F1", "answer in input")
    blocks: list[_Block] = []
    for title, rows in ((f"Sample right answers ({len(right)} right in all)", right),
                        (f"Sample wrong answers, lowest F1 first ({len(wrong)} wrong in all)", wrong)):
        blocks.append(("h2", title))
        if rows:
            blocks.append(("table", headers, [_sample_row(row) for row in rows[:_SAMPLES]]))
        else:
            blocks.append(("p", "None."))
    return blocks


def _sample_row(row: dict[str, Any]) -> tuple[str, ...]:
    references = row.get("references")
    if isinstance(references, (list, tuple)):
        refs_text = "; ".join(str(r) for r in references) if references else "(no answer)"
    else:
        refs_text = _value_text(references)
    in_input = row.get("answer_in_input")
    return (
        _cut(_value_text(row.get("id", ""))),
        _cut(_value_text(row.get("question", ""))),
        _cut(str(row.get("prediction", ""))) or "(empty)",
        _cut(refs_text),
        _value_text(row.get("f1", "")),
        "" if in_input is None else ("yes" if in_input else "no"),
    )


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_CELL_CHARS else text[: _MAX_CELL_CHARS - 1] + "…"


def _value_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        # Up to 4 significant digits (52.1, 0.61, 0.0003); big numbers (seconds) keep one decimal.
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value)
    return str(value)


# --- rendering ---------------------------------------------------------------------------------------------

def _md_text(text: str) -> str:
    # User text (questions, answers, config paths) must not break the table or inject markup when rendered.
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _to_markdown(blocks: list[_Block]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {_md_text(block[1])}\n")
        elif kind == "h2":
            out.append(f"## {_md_text(block[1])}\n")
        elif kind == "p":
            out.append(f"{_md_text(block[1])}\n")
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_text(h) for h in headers) + " |",
                     "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(_md_text(cell) for cell in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            # Relative link: the plots sit next to the report in the run directory.
            out.append(f"![{_md_text(block[2])}]({block[1].name})\n")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:0.25rem 0.5rem;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1rem 0}"
)


def _to_html(blocks: list[_Block]) -> str:
    esc = html.escape
    title = next((block[1] for block in blocks if block[0] == "h1"), "t5qa run report")
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "table":
            headers, rows = block[1], block[2]
            head = "".join(f"<th>{esc(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[1].read_bytes()).decode("ascii")
            body.append(f'<img alt="{esc(block[2])}" src="data:image/png;base64,{data}">')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
