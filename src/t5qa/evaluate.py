"""Evaluate a model on QA examples: teacher-forced loss and token accuracy, then EM/F1 of generated answers.

Generated answers come from the same `Predictor` users call, so the scores measure what `t5qa predict` and
the server return (long contexts in windows included). EM/F1 follow the official scorer chosen by name
(`metrics.py`: squad, squad_v2 or cmrc); `choose_metric_for` picks one from the data when none is given. Every
question entry of the reference data is scored: nothing is dropped, deduplicated or rewritten here.

With an `accelerate.Accelerator` of several processes, each process evaluates its own contiguous shard of the
examples; the per-example rows and the loss sums are gathered so every process returns the same metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.data import QAExample
from t5qa.encode import encode_for_training, make_collator
from t5qa.metrics import check_metric, choose_metric, pair_scores, score_predictions, token_accuracy
from t5qa.noanswer import NoAnswerCalibration, apply_threshold, choose_threshold
from t5qa.predict import DEFAULT_BATCH_SIZE, Answer, Predictor

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores of one evaluation and one row per example."""

    metrics: dict[str, float] = field(default_factory=dict)
    """loss (mean per target token), token_accuracy (0-1), exact_match and f1 (0-100), count, missing, and
    the scorer's own keys (see `metrics.score_predictions`)."""
    metric: str = "squad"
    """The scorer used: squad, squad_v2 or cmrc."""
    predictions: list[dict[str, Any]] = field(default_factory=list)
    """id, question, prediction, references, exact_match, f1 (0/1 and 0-1), answer_in_input, window,
    num_windows, score; in example order. A calibration adds margin, candidate and model_prediction."""
    no_answer: NoAnswerCalibration | None = None
    """The no-answer threshold chosen here (evaluate_model with calibrate_no_answer on data with unanswerable
    questions), with F1 before and after; None otherwise."""


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[QAExample],
    encode: EncodeConfig,
    generate: GenerateConfig,
    *,
    batch_size: int | None,
    metric: str | None = None,
    accelerator: Any = None,
    max_examples: int | None = None,
    calibrate_no_answer: bool = False,
) -> EvalResult:
    """Loss, token accuracy and EM/F1 of `model` on `examples`.

    Args:
        model: an AutoModelForSeq2SeqLM (may be wrapped by accelerate/DDP; its train/eval mode is restored).
        tokenizer: its tokenizer.
        examples: the evaluation examples.
        encode: how inputs are built (as in training).
        generate: decoding settings for the generated answers.
        batch_size: examples per forward pass (loss and generation); None: the answering backend's own choice
            (predict.TorchBackend.batch_size), and DEFAULT_BATCH_SIZE for the loss.
        metric: the scorer (squad, squad_v2, cmrc); None chooses one from the examples (`choose_metric_for`).
        accelerator: an `accelerate.Accelerator`; with several processes the work is sharded and gathered.
        max_examples: evaluate only the first N examples.
        calibrate_no_answer: where some question has no answer, choose the F1-best no-answer threshold on these
            examples (noanswer.py); the metrics and rows are then those with it applied, and `no_answer` holds
            it with the F1 before and after.
    Returns:
        EvalResult with the same metrics on every process, and per-example rows in example order.
    """
    started = time.perf_counter()
    examples = list(examples[:max_examples] if max_examples else examples)
    metric, calibrate, generate = plan_evaluation(examples, metric, generate, calibrate_no_answer)
    indices = list(range(len(examples)))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as shard:
            shard = list(shard)
        core = accelerator.unwrap_model(model)
    else:
        shard = indices
        core = model
    rows, sums = evaluate_rows(Predictor(core, tokenizer, encode, generate), [examples[i] for i in shard],
                               batch_size=batch_size, metric=metric, measure_no_answer=calibrate)
    indexed = list(zip(shard, rows))
    totals = [sums]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        indexed = gather_object(indexed)
        totals = gather_object(totals)
    by_index = dict(indexed)  # one row per example index, whichever process produced it
    if len(by_index) != len(examples):  # an internal invariant of sharding and gathering
        raise AssertionError(f"evaluation gathered {len(by_index)} rows for {len(examples)} examples")
    result = score_rows([by_index[i] for i in range(len(examples))], totals, metric, calibrate=calibrate)
    seconds = time.perf_counter() - started
    result.metrics["eval_seconds"] = seconds
    logger.debug("evaluated %d examples in %.1f s", len(examples), seconds)
    return result


def plan_evaluation(examples: Sequence[QAExample], metric: str | None, generate: GenerateConfig,
                    calibrate_no_answer: bool) -> tuple[str, bool, GenerateConfig]:
    """(the scorer, whether a no-answer threshold is calibrated, the settings the answers are generated with):
    the scorer named or chosen from the examples; a calibration only where some question has no answer, and then
    measured on the model's own answers, whatever threshold the settings carry."""
    metric = check_metric(metric) if metric is not None else choose_metric_for(examples)
    calibrate = calibrate_no_answer and any(not ex.answers for ex in examples)
    if calibrate:
        generate = dataclasses.replace(generate, no_answer_margin=None, calibrated_no_answer=False)
    return metric, calibrate, generate


def evaluate_rows(predictor: Predictor, examples: Sequence[QAExample], *, batch_size: int | None, metric: str,
                  measure_no_answer: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per example (its answer and scores, in order) and the sums loss and token accuracy are made of
    ({"loss_sum", "target_tokens", "correct_tokens"}), for `score_rows` to combine: one process's share, or one
    shard's (t5qa.shards). `predictor` (a torch-backend Predictor with the evaluation's settings) is built once
    by the caller, so its fast paths prove themselves once, not per part."""
    model = predictor.model
    was_training = model.training
    model.eval()
    try:
        loss_sum, target_tokens, correct = _teacher_forced(list(examples), model, predictor.tokenizer,
                                                           predictor.encode_config,
                                                           batch_size or DEFAULT_BATCH_SIZE)
        answers = predictor.answer_many([(ex.context, ex.question) for ex in examples], batch_size=batch_size,
                                        measure_no_answer=measure_no_answer)
    finally:
        model.train(was_training)
    rows = [_row(ex, a, metric) for ex, a in zip(examples, answers)]
    return rows, {"loss_sum": loss_sum, "target_tokens": target_tokens, "correct_tokens": correct}


def score_rows(predictions: list[dict[str, Any]], totals: Sequence[Mapping[str, float]], metric: str, *,
               calibrate: bool = False) -> EvalResult:
    """The metrics of every example's row (in example order) and the loss sums of the parts they came from;
    with `calibrate`, the F1-best no-answer threshold chosen on them and applied."""
    loss_total = sum(t["loss_sum"] for t in totals)
    tokens_total = sum(t["target_tokens"] for t in totals)
    correct_total = sum(t["correct_tokens"] for t in totals)
    metrics: dict[str, float] = {
        "loss": loss_total / tokens_total if tokens_total else float("nan"),
        "token_accuracy": correct_total / tokens_total if tokens_total else 0.0,
    }
    scores = score_predictions(metric, [(r["id"], r["prediction"], r["references"]) for r in predictions])
    answered = [r["in_context"] for r in predictions if r.get("in_context") is not None]
    # Of the non-empty answers, the share found in their context (grounding.find_in_context), 0-100.
    metrics["answers_in_context"] = 100.0 * sum(answered) / len(answered) if answered else 0.0
    no_answer = None
    if calibrate:
        predictions, no_answer, scores = _calibrate(predictions, metric, scores)
        metrics["no_answer_threshold"] = no_answer.threshold
        metrics.update({f"model_{key}": value for key, value in no_answer.before.items()})
    metrics.update(scores)
    return EvalResult(metrics=metrics, predictions=predictions, metric=metric, no_answer=no_answer)


_CALIBRATION_KEYS = ("f1", "exact_match", "HasAns_f1", "NoAns_f1")


def _calibrate(rows: list[dict[str, Any]], metric: str, before: dict[str, Any]
               ) -> tuple[list[dict[str, Any]], NoAnswerCalibration, dict[str, Any]]:
    """Choose the F1-best no-answer threshold on `rows` (each with its margin and candidate) and apply it: the
    rows and the scorer's metrics with it, and the calibration. A row without a candidate keeps its answer (its
    score is the same at every threshold)."""
    measured = [r for r in rows if r.get("margin") is not None]
    threshold, _ = choose_threshold([r["margin"] for r in measured],
                                    [pair_scores(metric, r["candidate"], r["references"])[1] for r in measured],
                                    [bool(r["references"]) for r in measured])
    after_rows = []
    for r in rows:
        text = apply_threshold(r["candidate"], r["margin"], threshold) if r.get("margin") is not None \
            else r["prediction"]
        exact, f1_value = pair_scores(metric, text, r["references"])
        after_rows.append({**r, "model_prediction": r["prediction"], "prediction": text, "exact_match": exact,
                           "f1": f1_value})
    after = score_predictions(metric, [(r["id"], r["prediction"], r["references"]) for r in after_rows])
    calibration = NoAnswerCalibration(
        threshold=threshold, chosen_on=f"{len(rows)} questions",
        before={k: round(before[k], 4) for k in _CALIBRATION_KEYS if k in before},
        after={k: round(after[k], 4) for k in _CALIBRATION_KEYS if k in after})
    return after_rows, calibration, after


def choose_metric_for(examples: Sequence[QAExample]) -> str:
    """The scorer the data calls for: cmrc when most contexts are Chinese, squad_v2 when some question has no
    answer, squad otherwise."""
    return choose_metric((ex.context for ex in examples), any(not ex.answers for ex in examples))


def _teacher_forced(
    examples: list[QAExample], model: Any, tokenizer: Any, encode: EncodeConfig, batch_size: int
) -> tuple[float, int, int]:
    """(summed token loss, target tokens, correctly predicted tokens) with teacher forcing."""
    import torch
    import torch.nn.functional as F

    if not examples:
        return 0.0, 0, 0
    features, stats = encode_for_training(examples, tokenizer, encode)
    if stats.needed_window:
        logger.info("%d of %d evaluated examples exceed %d input tokens: their loss and token accuracy are computed "
                    "on the window holding the answer; their answers are generated over every window",
                    stats.needed_window, stats.examples, encode.max_source_tokens)
    collate = make_collator(tokenizer)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    loss_sum, counted, correct = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate([features[i] for i in order[start:start + batch_size]])
            batch.pop("example_index", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits  # (batch, target_len, vocab)
            labels = batch["labels"]  # (batch, target_len), -100 on padding
            loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                              reduction="sum"))
            right, n = token_accuracy(logits.argmax(dim=-1), labels)
            correct += right
            counted += n
    return loss_sum, counted, correct


def _answer_in_input(example: QAExample, start: int, end: int) -> bool | None:
    """Whether a reference answer lies inside context[start:end] (None for an unanswerable question)."""
    if not example.answers:
        return None
    for k, answer in enumerate(example.answers):
        answer_start = example.answer_starts[k] if k < len(example.answer_starts) else -1
        if answer_start >= 0:
            if start <= answer_start and answer_start + len(answer) <= end:
                return True
        elif answer and answer in example.context[start:end]:
            return True
    return False


def _row(example: QAExample, answer: Answer, metric: str) -> dict[str, Any]:
    references = list(example.answers)
    exact, f1_value = pair_scores(metric, answer.text, references)
    return {
        "id": example.id,
        "question": example.question,
        "prediction": answer.text,
        "references": references,
        "exact_match": exact,
        "f1": f1_value,
        "answer_in_input": _answer_in_input(example, answer.window_char_start, answer.window_char_end),
        "window": answer.window_index,
        "num_windows": answer.num_windows,
        "score": answer.score,
        "in_context": answer.in_context,
        **({"margin": answer.margin, "candidate": answer.candidate} if answer.margin is not None else {}),
        **_example_shape(example),
    }


def _example_shape(example: QAExample) -> dict[str, Any]:
    """What error analysis buckets by (analysis.py): the context's length, and where the first reference answer
    starts in it (a fraction of the context; None without an answer or a known position)."""
    start = example.answer_starts[0] if example.answer_starts else -1
    return {"context_chars": len(example.context),
            "answer_position": start / max(len(example.context), 1) if start >= 0 else None}


def evaluate_predictions(
    predictions: Mapping[str, str],
    examples: Sequence[QAExample],
    *,
    metric: str | None = None,
    no_answer_probs: Mapping[str, float] | None = None,
    no_answer_threshold: float = 1.0,
) -> EvalResult:
    """Score answers produced elsewhere (a predictions file) against the examples' references.

    Every example is scored, in order, duplicates included (squad_v2 keys by id, as its script does). A
    question without a prediction scores 0 and is counted in "missing"; predictions for ids that are not in
    the examples are counted in "unmatched_predictions" and logged.

    Args:
        predictions: question id -> predicted answer text.
        examples: the reference data, as `data.load_for_evaluation` reads it.
        metric: the scorer; None chooses one from the examples.
        no_answer_probs, no_answer_threshold: squad_v2's no-answer probabilities and threshold.
    Returns:
        EvalResult with the scorer's metrics and one row per example (answer_in_input and window are None:
        there is no model input to look at).
    Raises:
        DataError: a predicted question has no no-answer probability.
    """
    from t5qa.errors import DataError

    metric = check_metric(metric) if metric is not None else choose_metric_for(examples)
    entries = [(ex.id, predictions.get(ex.id), list(ex.answers)) for ex in examples]
    try:
        metrics = score_predictions(metric, entries, no_answer_probs=no_answer_probs,
                                    no_answer_threshold=no_answer_threshold)
    except ValueError as exc:
        raise DataError(f"no-answer probabilities: {exc}; give one for every predicted question") from None
    known = {ex.id for ex in examples}
    unmatched = [qid for qid in predictions if qid not in known]
    metrics["unmatched_predictions"] = len(unmatched)
    if unmatched:
        logger.warning("%d predictions have ids that are not in the reference data, e.g. %s; they are not scored",
                       len(unmatched), ", ".join(repr(q) for q in unmatched[:3]))
    if metrics["missing"]:
        logger.warning("%d of %d questions have no prediction; each scores 0", metrics["missing"], len(examples))
    rows = []
    for ex, (_, text, references) in zip(examples, entries):
        exact, f1_value = pair_scores(metric, text, references) if text is not None else (0.0, 0.0)
        rows.append({
            "id": ex.id, "question": ex.question, "prediction": text, "references": references,
            "exact_match": exact, "f1": f1_value, "answer_in_input": None, "window": None,
            **_example_shape(ex),
        })
    return EvalResult(metrics=metrics, predictions=rows, metric=metric)


def write_predictions(result: EvalResult, path: str | os.PathLike) -> Path:
    """Write the per-example rows as JSON lines (one object per example, in example order), and next to them
    PATH's stem + ".breakdown.json": EM and F1 by context length, answer length, question word, answer position,
    window, answer-in-input and empty prediction (`analysis.breakdown`). Returns the breakdown's path."""
    from t5qa.analysis import breakdown

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in result.predictions:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    analysis_path = breakdown_path(path)
    analysis_path.write_text(json.dumps({"metric": result.metric, "rows": len(result.predictions),
                                         "breakdown": breakdown(result.predictions)}, ensure_ascii=False, indent=1)
                             + "\n", encoding="utf-8")
    return analysis_path


def breakdown_path(predictions_path: str | os.PathLike) -> Path:
    """Where `write_predictions` puts the error analysis of the rows in `predictions_path`."""
    path = Path(predictions_path)
    return path.with_name(f"{path.stem}.breakdown.json")


def read_no_answer_probs(path: str | os.PathLike) -> dict[str, float]:
    """Read no-answer probabilities: one JSON object id -> number (the SQuAD v2.0 script's --na-prob-file).

    Raises:
        DataError: the file is missing, not JSON, or holds a value that is not a number.
    """
    from t5qa.errors import DataError

    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check --no-answer-probs") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a UTF-8 JSON object of id -> probability ({exc}); fix the file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object of id -> probability, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise DataError(f"{path}: the no-answer probability of id {bad[0]!r} is not a number")
    return {str(k): float(v) for k, v in obj.items()}


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read a predictions file: JSON lines with "id" and "prediction" (or "answer"), or one JSON object
    mapping id -> answer (the official SQuAD format).

    Raises:
        DataError: the file is missing or malformed, naming the line and the fix.
    """
    from t5qa.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file; check --predictions")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the predictions file as UTF-8") from None
    stripped = text.strip()
    if not stripped:
        raise DataError(f"{path}: the predictions file is empty")
    jsonl = path.suffix.lower() in (".jsonl", ".jsonlines", ".ndjson")
    if stripped.startswith("{") and not jsonl:
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            obj = None
        # A dict with an "id" key is one JSON-lines row, not an id -> answer mapping.
        if isinstance(obj, dict) and "id" not in obj:
            bad = [k for k, v in obj.items() if not isinstance(v, str)]
            if bad:
                raise DataError(f"{path}: in an id -> answer JSON object every value must be a string; "
                                f"id {bad[0]!r} is not")
            return dict(obj)
    out: dict[str, str] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg}); expected one JSON object per line "
                            f'like {{"id": "q1", "prediction": "..."}}') from None
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f'{path}:{line_no}: each line needs an "id" and a "prediction" (or "answer") field')
        value = row.get("prediction", row.get("answer"))
        if value is None:
            raise DataError(f'{path}:{line_no}: no "prediction" or "answer" field for id {row["id"]!r}')
        if isinstance(value, dict):  # e.g. {"text": ...} as written by some tools
            value = value.get("text", "")
        out[str(row["id"])] = str(value)
    return out


