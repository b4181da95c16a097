"""Answer scoring: SQuAD exact match and F1, character-level for CJK text, and teacher-forced token accuracy.

Pure Python. Scores agree with the official SQuAD v1.1 evaluation script for answerable questions (same
normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace; F1 over
whitespace tokens, max over the reference answers) and with the SQuAD v2.0 rule for unanswerable ones: a
question whose reference list is empty is answered correctly by a prediction that normalises to "".

Chinese, Japanese and Korean have no spaces between words, so whitespace tokens would make any partial answer
score 0. When the prediction or a reference contains CJK characters, the pair is scored the way the CMRC 2018
scorer does it: each CJK character is one token, runs of other characters are one token each, and CJK /
full-width punctuation is dropped as well.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# Han (basic, extension A, extension B-F, compatibility), Japanese kana (incl. half-width katakana) and
# Korean Hangul (syllables and jamo).
_CJK_RANGES = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F),
    (0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F),
    (0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF),
)
_CJK_CHAR = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES) + "]")
# In CJK mode: every CJK character alone, or a run of anything else that is not whitespace.
_CJK_TOKEN = re.compile(f"{_CJK_CHAR.pattern}|(?:(?!{_CJK_CHAR.pattern})\\S)+")


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official SQuAD v1.1 script does.

    Lowercase, remove every character of `string.punctuation`, remove the whole words a/an/the, and collapse
    runs of whitespace to single spaces (leading and trailing whitespace removed).
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if ch not in _ASCII_PUNCTUATION)
    no_articles = _ARTICLES.sub(" ", no_punct)
    return " ".join(no_articles.split())


def has_cjk(text: str) -> bool:
    """Whether `text` contains a Chinese, Japanese or Korean character."""
    return _CJK_CHAR.search(text) is not None


def _is_extra_punctuation(ch: str) -> bool:
    # Unicode punctuation (，。！？、；：“”‘’（）《》「」【】…— and friends) and full-width forms of ASCII
    # punctuation such as ＄＋＜＝＞～, which are symbols rather than punctuation in Unicode.
    if unicodedata.category(ch).startswith("P"):
        return True
    return 0xFF01 <= ord(ch) <= 0xFF5E and chr(ord(ch) - 0xFEE0) in _ASCII_PUNCTUATION


def _cjk_tokens(text: str) -> list[str]:
    """SQuAD normalisation, minus CJK/full-width punctuation, then character-level tokens for CJK."""
    normalised = normalize_answer(text)
    normalised = "".join(ch for ch in normalised if not _is_extra_punctuation(ch))
    return _CJK_TOKEN.findall(normalised)


def _tokens(prediction: str, reference: str) -> tuple[list[str], list[str]]:
    if has_cjk(prediction) or has_cjk(reference):
        return _cjk_tokens(prediction), _cjk_tokens(reference)
    return normalize_answer(prediction).split(), normalize_answer(reference).split()


def _pair_exact(prediction: str, reference: str) -> float:
    if has_cjk(prediction) or has_cjk(reference):
        # Spaces carry no meaning between CJK characters, so compare token lists, not strings.
        return float(_cjk_tokens(prediction) == _cjk_tokens(reference))
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _pair_f1(prediction: str, reference: str) -> float:
    predicted, gold = _tokens(prediction, reference)
    # Multiset intersection: a token counts as often as it occurs in both. As in the v1.1 script, no overlap
    # (including two empty token lists) gives 0.
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def _as_references(references: Sequence[str] | str) -> list[str]:
    # A bare string is a Sequence too; iterating it would score each character as a reference.
    if isinstance(references, str):
        return [references]
    return list(references)


def is_unanswerable(references: Sequence[str] | str) -> bool:
    """Whether a reference list means "no answer" (SQuAD v2): empty, or only blank strings."""
    return not any(ref.strip() for ref in _as_references(references))


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """Exact match of one prediction: 1.0 if it equals any reference after normalisation, else 0.0.

    Args:
        prediction: the predicted answer text.
        references: the reference answers; empty (or only blank strings) means the question is
            unanswerable, and then only a prediction that normalises to "" scores 1.0.
    Returns:
        1.0 or 0.0.
    """
    refs = _as_references(references)
    if is_unanswerable(refs):
        return float(normalize_answer(prediction) == "")
    return max(_pair_exact(prediction, ref) for ref in refs)


def f1(prediction: str, references: Sequence[str]) -> float:
    """Token-overlap F1 of one prediction, the maximum over the references (0.0 to 1.0).

    Args:
        prediction: the predicted answer text.
        references: the reference answers; empty (or only blank strings) means unanswerable, scored like
            `exact_match` (SQuAD v2).
    Returns:
        F1 in [0, 1].
    """
    refs = _as_references(references)
    if is_unanswerable(refs):
        return float(normalize_answer(prediction) == "")
    return max(_pair_f1(prediction, ref) for ref in refs)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Score a set of predictions like the official SQuAD script, as percentages.

    Every id in `references` is scored; an id without a prediction scores as the empty answer and is
    counted in "missing". Predictions for ids not in `references` are ignored (and logged).

    Args:
        predictions: question id -> predicted answer text.
        references: question id -> reference answers ([] for an unanswerable question).
    Returns:
        {"exact_match": 0-100, "f1": 0-100, "count": n, "missing": m}; when some questions are
        unanswerable also "HasAns_exact_match", "HasAns_f1", "HasAns_count", "NoAns_exact_match",
        "NoAns_f1", "NoAns_count" (a group with count 0 reports 0.0). With no references at all every
        score is 0.0 and count is 0.
    """
    per_group: dict[str, list[tuple[float, float]]] = {"HasAns": [], "NoAns": []}
    missing = 0
    for qid, refs in references.items():
        prediction = predictions.get(qid)
        if prediction is None:
            missing += 1
            prediction = ""
        group = "NoAns" if is_unanswerable(refs) else "HasAns"
        per_group[group].append((exact_match(prediction, refs), f1(prediction, refs)))
    extra = len(set(predictions) - set(references))
    if missing:
        logger.warning("%d of %d questions have no prediction; they score as empty answers", missing, len(references))
    if extra:
        logger.warning("%d predictions have ids that are not in the references; they are ignored", extra)
    if not references:
        logger.warning("no reference answers to score; every score is 0")

    everything = per_group["HasAns"] + per_group["NoAns"]
    scores: dict[str, Any] = {**_percentages(everything), "count": len(everything), "missing": missing}
    if per_group["NoAns"]:
        for group, rows in per_group.items():
            for key, value in _percentages(rows).items():
                scores[f"{group}_{key}"] = value
            scores[f"{group}_count"] = len(rows)
    return scores


def _percentages(rows: list[tuple[float, float]]) -> dict[str, float]:
    if not rows:
        return {"exact_match": 0.0, "f1": 0.0}
    return {
        "exact_match": 100.0 * sum(em for em, _ in rows) / len(rows),
        "f1": 100.0 * sum(score for _, score in rows) / len(rows),
    }


def token_accuracy(predicted_ids: Any, labels: Any, ignore_index: int = -100) -> tuple[int, int]:
    """Teacher-forced token accuracy counts: positions where the predicted id equals the label.

    Args:
        predicted_ids: argmax of the logits, (batch, target_len), as a torch tensor, numpy array or nested lists.
        labels: the labels, same shape; positions equal to `ignore_index` (padding) are not counted.
        ignore_index: the label value of positions to skip.
    Returns:
        (correct, counted): summed over processes and batches, accuracy = correct / counted.
    Raises:
        ValueError: the shapes differ (a caller bug, not a user error).
    """
    if _is_tensor(predicted_ids) or _is_tensor(labels):
        import torch  # only needed when the inputs are tensors

        pred = torch.as_tensor(predicted_ids)
        gold = torch.as_tensor(labels, device=pred.device)
        if pred.shape != gold.shape:
            raise ValueError(
                f"token_accuracy: predicted_ids shape {tuple(pred.shape)} != labels shape {tuple(gold.shape)}"
            )
        mask = gold != ignore_index
        return int((pred.eq(gold) & mask).sum().item()), int(mask.sum().item())

    pred_flat = list(_flatten(predicted_ids))
    gold_flat = list(_flatten(labels))
    if _shape(predicted_ids) != _shape(labels):
        raise ValueError(
            f"token_accuracy: predicted_ids shape {_shape(predicted_ids)} != labels shape {_shape(labels)}"
        )
    counted = correct = 0
    for p, g in zip(pred_flat, gold_flat):
        if g == ignore_index:
            continue
        counted += 1
        correct += int(p == g)
    return correct, counted


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "shape")


def _listify(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _flatten(value: Any) -> Iterable[Any]:
    value = _listify(value)
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _shape(value: Any) -> tuple[Any, ...]:
    # Ragged lists get a nested description, so two differently ragged inputs never compare equal.
    value = _listify(value)
    if isinstance(value, (list, tuple)):
        return (len(value), tuple(_shape(item) for item in value))
    return ()
