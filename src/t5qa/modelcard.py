"""The model card (`README.md`) that training writes into `best/` and `last/`: what the model is, what it was
trained on (and what cleaning did to that data), how, how well (EM/F1 with the scorer used), how long and on what,
how to load it with transformers alone and with t5qa, and its limits.

The card is Hugging Face's format: YAML metadata first (library, pipeline, base model, metrics), then Markdown, so
the Hub shows it as the model's page once the directory is uploaded. It names files by their base name only:
nothing of the training machine's directory layout goes into a card meant to be published.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
# How each scorer t5qa uses is defined, for the card's results.
METRIC_NAMES = {
    "squad": "the official SQuAD v1.1 exact match and F1",
    "squad_v2": "the official SQuAD v2.0 exact match and F1 (unanswerable questions count)",
    "cmrc2018": "the official CMRC 2018 exact match and F1 (character-level, for Chinese)",
}
# Hyperparameters shown, in this order, where the run's config has them.
HYPERPARAMETERS = ("learning_rate", "epochs", "max_steps", "train_batch_size", "gradient_accumulation_steps",
                   "optimizer", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay", "label_smoothing",
                   "max_grad_norm", "precision", "seed")


def write_model_card(model_dir: Path, run_dir: Path, *, last: bool = False) -> Path:
    """Write `model_dir`/README.md from the model's t5qa.json and the run directory's summaries; `last`: the model
    is the run's final one (last/), scored by the last evaluation rather than the best."""
    from t5qa.rundir import RUN_SUMMARY_FILE, SUMMARY_FILE

    def read(path: Path) -> dict[str, Any]:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    card = model_card(read(model_dir / "t5qa.json"), read(run_dir / RUN_SUMMARY_FILE), read(run_dir / SUMMARY_FILE),
                      name=run_dir.name, last=last)
    path = model_dir / CARD_FILE
    path.write_text(card, encoding="utf-8")
    return path


def public_name(value: Any) -> str | None:
    """A Hub id as it is; a local path by its base name (a card is published, the machine's paths are not)."""
    if not value:
        return None
    text = str(value)
    return Path(text).name if _is_local(text) else text


def _is_local(text: str) -> bool:
    return os.path.isabs(text) or text.startswith(".") or os.path.exists(text)


def _is_hub_id(value: Any) -> bool:
    text = str(value or "")
    return bool(text) and not _is_local(text) and text.count("/") <= 1


def _metrics_at(summary: dict[str, Any], last: bool) -> tuple[Any, dict[str, Any]]:
    """(step, metrics) of the evaluation that describes the model: the best one, or the last."""
    if last:
        history = [e for e in summary.get("eval_history") or [] if isinstance(e, dict)]
        return (history[-1].get("step") if history else None), summary.get("final_metrics") or {}
    return summary.get("best_step"), _metrics_at_best(summary)


def _metrics_at_best(summary: dict[str, Any]) -> dict[str, Any]:
    best = summary.get("best_step")
    for entry in summary.get("eval_history") or []:
        if isinstance(entry, dict) and entry.get("step") == best:
            return entry
    return summary.get("final_metrics") or {}


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def model_card(meta: dict[str, Any], run_summary: dict[str, Any], summary: dict[str, Any], *, name: str,
               last: bool = False) -> str:
    """The card's text (see the module docstring)."""
    from t5qa import __version__

    config = meta.get("train_config") or {}
    encode = meta.get("encode") or {}
    base = config.get("model") or run_summary.get("model")
    metric = run_summary.get("metric") or config.get("metric") or "squad"
    step, best = _metrics_at(summary, last)
    template = encode.get("prompt_template", "question: {question} context: {context}")
    front = ["---", "library_name: transformers", "pipeline_tag: text2text-generation",
             "tags:", "- t5qa", "- question-answering", "- text2text-generation"]
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    front += ["metrics:", "- exact_match", "- f1", "---", ""]
    lines = [*front, f"# {name}", ""]
    lines += [f"A sequence-to-sequence model fine-tuned with t5qa {__version__} to answer a question from a context, "
              f"starting from `{public_name(base) or 'unknown'}`.", ""]

    lines += ["## Results", ""]
    if "f1" in best:
        questions = run_summary.get("validation_examples", "?")
        lines += [f"On the validation set ({questions} questions), scored with {METRIC_NAMES.get(metric, metric)}, "
                  f"at step {step} " + ("(the last evaluation; this is the run's final model):" if last else
                                        f"(the best by {summary.get('metric_for_best', 'f1')}):"), "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_number(best[key])} |" for key in ("exact_match", "f1", "loss", "token_accuracy")
                  if key in best]
        if meta.get("no_answer"):
            threshold = meta["no_answer"].get("threshold")
            lines += ["", f"A no-answer threshold ({_number(threshold)}, the margin between the best answer and the "
                      "empty one) was calibrated on the same validation set and is applied by t5qa's predict, "
                      "evaluate and serve; the figures after it are optimistic for that reason."]
    else:
        lines += ["This model was not evaluated during training (no validation set)."]
    lines.append("")

    lines += ["## Training data", ""]
    train_file, validation_file = public_name(config.get("train")), public_name(config.get("validation"))
    if run_summary.get("streaming"):
        lines.append(f"- training: `{train_file or 'unknown'}`, streamed (read as training went, "
                     f"{run_summary.get('total_steps', '?')} steps)")
    else:
        lines.append(f"- training: `{train_file or 'unknown'}`, {run_summary.get('examples', '?')} examples after "
                     "cleaning")
    lines.append(f"- validation: `{validation_file}`" if validation_file else
                 f"- validation: {run_summary.get('validation_examples', 0)} examples held out from the training "
                 "file, grouped by context so that no validation context was seen in training")
    for split, report in (run_summary.get("cleaning") or {}).items():
        if not isinstance(report, dict):
            continue
        if report.get("streamed"):
            lines.append(f"- cleaning of the {split} data: per chunk of rows as the stream was read (the training "
                         "log has the counts)")
            continue
        dropped = ", ".join(f"{k} {v}" for k, v in (report.get("dropped") or {}).items()) or "none"
        flagged = ", ".join(f"{k} {v}" for k, v in (report.get("flagged") or {}).items()) or "none"
        lines.append(f"- cleaning of the {split} data: {report.get('total_in', '?')} read, "
                     f"{report.get('total_out', '?')} kept; dropped: {dropped}; flagged and kept: {flagged}")
    if run_summary.get("examples_needing_window"):
        lines.append(f"- {run_summary['examples_needing_window']} training examples were longer than the model's "
                     "input and were trained on the window holding their answer")
    lines.append("")

    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    shown = [key for key in HYPERPARAMETERS if config.get(key) not in (None, "")]
    if config.get("max_steps"):  # the step count decides, not the epochs asked for
        shown = [key for key in shown if key != "epochs"]
    lines += [f"| {key} | {config[key]} |" for key in shown]
    lines += [f"| {key} | {encode[key]} |" for key in ("max_source_tokens", "max_target_tokens", "stride_tokens")
              if key in encode]
    if "effective_batch_size" in run_summary:
        lines.append(f"| effective batch size | {run_summary['effective_batch_size']} |")
    lines.append("")
    hardware = run_summary.get("device", "unknown")
    processes = run_summary.get("processes", 1)
    epochs = f" ({summary['epochs']} epochs)" if "epochs" in summary else ""
    lines += [f"{summary.get('steps', '?')} optimizer steps{epochs}: {_number(summary.get('train_seconds', '?'))} s in "
              f"training steps and {_number(summary.get('eval_seconds', 0.0))} s in evaluation, on {hardware}"
              f"{f' x {processes} processes' if processes and processes > 1 else ''} "
              f"({platform.machine() or 'unknown machine'}), precision {run_summary.get('precision', '?')}.", ""]

    lines += ["## How to use", "", "With transformers alone (the prompt is the one the model was trained with):", "",
              "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("MODEL")',
              'model = AutoModelForSeq2SeqLM.from_pretrained("MODEL")',
              'context = "Anomaly detection finds unusual records, for example credit card fraud."',
              'question = "What is an example of anomaly detection?"',
              f"prompt = {template!r}.format(question=question, context=context)",
              f"inputs = tokenizer(prompt, return_tensors=\"pt\", truncation=True, "
              f"max_length={encode.get('max_source_tokens', 512)})",
              f"answer = tokenizer.decode(model.generate(**inputs, max_new_tokens="
              f"{meta.get('answer_tokens_p99') or 32})[0], skip_special_tokens=True)",
              "```", "",
              "With t5qa (long contexts in overlapping windows, batching, the calibrated no-answer threshold):", "",
              "```bash", 't5qa predict --model MODEL --context "..." --question "..."',
              "t5qa serve --model MODEL   # an HTTP API and a web page on localhost", "```", "",
              "where MODEL is this directory, or its name on the Hub once uploaded.", ""]

    lines += ["## Intended use and limits", "",
              "- Extractive or short abstractive answers to questions about a given context, in the language and "
              "domain of the training data; it is not a source of facts beyond its context.",
              "- Answers are generated, so they can be words that are not in the context; `t5qa predict "
              "--grounded` restricts each answer to a span of its context.",
              "- Quality outside the validation data above is not measured: evaluate on your own data "
              "(`t5qa evaluate --model MODEL --data FILE`) before relying on it.", ""]
    return "\n".join(lines)
