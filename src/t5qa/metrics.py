"""Answer scoring by the official definitions, selectable by name, and teacher-forced token accuracy.

Three scorers, each equal to its community's official evaluation script (pure Python, no torch):

- `squad`: the SQuAD v1.1 script (`evaluate-v1.1.py`). Normalise (lowercase, drop ASCII punctuation, drop the
  articles a/an/the, collapse whitespace); EM on normalised strings; F1 over whitespace tokens as a multiset;
  max over the reference answers; every question entry counts (a repeated id counts each time); a question
  without a prediction scores 0.
- `squad_v2`: the SQuAD v2.0 script (`evaluate-v2.0.py`). Same normalisation; references that normalise to ""
  are dropped, and a question left with none is answered only by an empty prediction; F1 is 1 when both sides
  are empty and 0 when one is; scores are keyed by id, so a repeated id counts once (its last entry wins);
  HasAns / NoAns splits; with no-answer probabilities, the threshold applied (default 1.0) and the best
  threshold for EM and for F1.
- `cmrc`: the CMRC 2018 script (`cmrc2018_evaluate.py`), which DRCD uses too. Lowercase and strip; "mixed
  segmentation" (each Chinese character U+4E00-U+9FA5 is a segment, runs of other text are split by NLTK's
  `word_tokenize`), with a fixed list of Chinese and ASCII punctuation removed; F1 from the longest common
  contiguous run of segments; EM on the punctuation-stripped strings; max over references; a question without
  a prediction scores 0.

Where an official script has no answer (it crashes), t5qa extends it and says so here:
- a question with no reference at all (unanswerable) under `squad` or `cmrc` scores 1 for a prediction that
  normalises (segments) to nothing, else 0, as under `squad_v2`;
- a question without a prediction under `squad_v2` scores 0 and is counted (the official script skips it in
  the totals and then fails on the HasAns split); so does a question whose no-answer probability is missing;
- `cmrc` uses NLTK's sentence splitter inside `word_tokenize` when NLTK's `punkt_tab` data is installed (as the
  official script does); without it (offline machines) each run is one sentence, which differs only when a run
  of non-Chinese text holds a sentence-ending period followed by more text.

Names in t5qa's output: exact_match, f1, count (the scripts' exact/EM, f1/F1, total/TOTAL); missing (questions
without a prediction, CMRC's SKIP); HasAns_* and NoAns_* for squad_v2; best_exact_match, best_exact_match_thresh,
best_f1, best_f1_thresh for squad_v2 with no-answer probabilities; average ((EM + F1) / 2) for cmrc.
"""

from __future__ import annotations

import functools
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from t5qa.config import SCORERS

logger = logging.getLogger(__name__)


_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# Han (basic, extension A, extension B-F, compatibility), Japanese kana (incl. half-width katakana) and
# Korean Hangul (syllables and jamo): used to decide whether a text is CJK.
_CJK_RANGES = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F),
    (0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F),
    (0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF),
)
_CJK_CHAR = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES) + "]")

# The CMRC 2018 script's own lists, character for character. Its list holds "……" as one two-character entry,
# which never equals a single character, so "…" is never removed; "‘" is not in it either (only "’").
_CMRC_PUNCTUATION = frozenset([
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
])
_CMRC_CHINESE = re.compile("[\u4e00-\u9fa5]")


# ------------------------------------------------------------------------------------------ SQuAD v1.1/v2.0


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official SQuAD v1.1 and v2.0 scripts do.

    Lowercase, remove every character of `string.punctuation`, remove the whole words a/an/the, and collapse
    runs of whitespace to single spaces (leading and trailing whitespace removed).
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if ch not in _ASCII_PUNCTUATION)
    no_articles = _ARTICLES.sub(" ", no_punct)
    return " ".join(no_articles.split())


def _as_references(references: Sequence[str] | str) -> list[str]:
    # A bare string is a Sequence too; iterating it would score each character as a reference.
    if isinstance(references, str):
        return [references]
    return list(references)


def _multiset_f1(predicted: list[str], gold: list[str]) -> float:
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_exact(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 exact match of one prediction: max over the references, 1.0 or 0.0.

    An empty reference list (t5qa's extension) is answered only by a prediction that normalises to "".
    """
    refs = _as_references(references)
    if not refs:
        return float(normalize_answer(prediction) == "")
    predicted = normalize_answer(prediction)
    return max(float(predicted == normalize_answer(ref)) for ref in refs)


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 token F1 of one prediction (0-1): max over the references; no overlap gives 0."""
    refs = _as_references(references)
    if not refs:
        return float(normalize_answer(prediction) == "")
    predicted = normalize_answer(prediction).split()
    return max(_multiset_f1(predicted, normalize_answer(ref).split()) for ref in refs)


def _v2_gold(references: Sequence[str]) -> list[str]:
    # v2.0 drops references that normalise to nothing; with none left, only "" is right.
    return [ref for ref in _as_references(references) if normalize_answer(ref)] or [""]


def squad_v2_exact(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v2.0 exact match of one prediction (1.0 or 0.0)."""
    predicted = normalize_answer(prediction)
    return max(float(normalize_answer(ref) == predicted) for ref in _v2_gold(references))


def _v2_pair_f1(gold: str, prediction: str) -> float:
    gold_tokens = normalize_answer(gold).split()
    predicted = normalize_answer(prediction).split()
    if not gold_tokens or not predicted:  # no-answer on either side: right only when both are
        return float(gold_tokens == predicted)
    return _multiset_f1(predicted, gold_tokens)


def squad_v2_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v2.0 token F1 of one prediction (0-1)."""
    return max(_v2_pair_f1(ref, prediction) for ref in _v2_gold(references))


# ------------------------------------------------------------------------------------------------ CMRC 2018


@functools.lru_cache(maxsize=1)
def _word_tokenizer() -> Callable[[str], list[str]]:
    try:
        from nltk.tokenize import word_tokenize
    except ImportError:  # pragma: no cover - nltk is a core dependency
        raise RuntimeError("the cmrc metric needs NLTK; install it with: pip install nltk") from None
    import nltk.data

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return word_tokenize
    except LookupError:
        logger.info("cmrc metric: NLTK's punkt_tab data is not installed; English runs are tokenised as one "
                    "sentence each (python -m nltk.downloader punkt_tab installs it)")
        return functools.partial(word_tokenize, preserve_line=True)


def mixed_segmentation(text: str, remove_punctuation: bool = True) -> list[str]:
    """CMRC 2018's segments of `text`: each Chinese character alone, NLTK word tokens for the rest.

    Lowercased and stripped first; with `remove_punctuation`, the script's punctuation list is dropped.
    """
    segments: list[str] = []
    pending = ""
    for ch in str(text).lower().strip():
        if remove_punctuation and ch in _CMRC_PUNCTUATION:
            continue
        if _CMRC_CHINESE.match(ch) or ch in _CMRC_PUNCTUATION:
            if pending:
                segments.extend(_word_tokenizer()(pending))
                pending = ""
            segments.append(ch)
        else:
            pending += ch
    if pending:
        segments.extend(_word_tokenizer()(pending))
    return segments


def _cmrc_strip(text: str) -> str:
    return "".join(ch for ch in str(text).lower().strip() if ch not in _CMRC_PUNCTUATION)


def _longest_common_run(a: list[str], b: list[str]) -> int:
    """Length of the longest contiguous run of segments that `a` and `b` share (dynamic programming)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_exact(prediction: str, references: Sequence[str]) -> float:
    """CMRC 2018 exact match (1.0 or 0.0): punctuation-stripped, lowercased strings equal for some reference.

    An empty reference list (t5qa's extension) is answered only by a prediction with no segments.
    """
    refs = _as_references(references)
    if not refs:
        return float(not mixed_segmentation(prediction))
    predicted = _cmrc_strip(prediction)
    return float(any(_cmrc_strip(ref) == predicted for ref in refs))


def cmrc_f1(prediction: str, references: Sequence[str]) -> float:
    """CMRC 2018 F1 (0-1): from the longest common contiguous run of segments, max over the references."""
    refs = _as_references(references)
    predicted = mixed_segmentation(prediction)
    if not refs:
        return float(not predicted)
    best = 0.0
    for ref in refs:
        gold = mixed_segmentation(ref)
        common = _longest_common_run(gold, predicted)
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ------------------------------------------------------------------------------------------------- scoring


_PAIR = {
    "squad": (squad_exact, squad_f1),
    "squad_v2": (squad_v2_exact, squad_v2_f1),
    "cmrc": (cmrc_exact, cmrc_f1),
}


def check_metric(metric: str) -> str:
    """`metric` if it names a scorer, else ValueError naming the choices."""
    if metric not in _PAIR:
        raise ValueError(f"--metric must be one of {', '.join(SCORERS)}, got {metric!r}")
    return metric


def pair_scores(metric: str, prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(exact match 0/1, F1 0-1) of one prediction under `metric` ("squad", "squad_v2" or "cmrc")."""
    exact, f1_of = _PAIR[check_metric(metric)]
    return exact(prediction, references), f1_of(prediction, references)


def is_chinese(text: str) -> bool:
    """Whether most of the letters of `text` are Han characters (a Chinese text, simplified or traditional)."""
    han = letters = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
            han += bool(_CMRC_CHINESE.match(ch) or (_CJK_CHAR.match(ch) and not _is_kana_or_hangul(ch)))
    return letters > 0 and han * 2 > letters


def _is_kana_or_hangul(ch: str) -> bool:
    code = ord(ch)
    return 0x3040 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9F or 0xAC00 <= code <= 0xD7FF or 0x1100 <= code <= 0x11FF


def has_cjk(text: str) -> bool:
    """Whether `text` contains a Chinese, Japanese or Korean character."""
    return _CJK_CHAR.search(text) is not None


def choose_metric(contexts: Iterable[str], any_unanswerable: bool) -> str:
    """The scorer that fits the data: cmrc when most distinct contexts are Chinese, squad_v2 when some
    question has no answer, squad otherwise."""
    distinct = set(contexts)
    chinese = sum(is_chinese(c) for c in distinct)
    if distinct and chinese * 2 > len(distinct):
        return "cmrc"
    return "squad_v2" if any_unanswerable else "squad"


def score_predictions(
    metric: str,
    entries: Sequence[tuple[str, str | None, Sequence[str]]],
    *,
    no_answer_probs: Mapping[str, float] | None = None,
    no_answer_threshold: float = 1.0,
) -> dict[str, Any]:
    """Score question entries the way `metric`'s official script does, as percentages.

    Args:
        metric: "squad", "squad_v2" or "cmrc".
        entries: (id, prediction or None when there is none, reference answers) for every question entry of
            the reference data, in file order; [] references mean unanswerable.
        no_answer_probs: squad_v2 only: id -> probability that the question has no answer; adds the best
            thresholds and applies `no_answer_threshold` (a prediction whose probability exceeds it counts as
            "no answer").
        no_answer_threshold: as the v2.0 script's --na-prob-thresh.
    Returns:
        exact_match, f1 (0-100), count and missing; squad_v2 adds duplicate_ids (entries superseded by a
        later entry with the same id), HasAns_* / NoAns_* (exact_match, f1, count) for the groups present and,
        with no_answer_probs, best_exact_match(_thresh) and best_f1(_thresh); cmrc adds average.
    Raises:
        ValueError: an unknown metric, or a predicted id without a no-answer probability.
    """
    check_metric(metric)
    if metric == "squad_v2":
        return _score_squad_v2(entries, no_answer_probs, no_answer_threshold)
    exact_sum = f1_sum = 0.0
    missing = 0
    for _, prediction, references in entries:
        if prediction is None:
            missing += 1
            continue
        em, f1_value = pair_scores(metric, prediction, references)
        exact_sum += em
        f1_sum += f1_value
    count = len(entries)
    scores: dict[str, Any] = {
        "exact_match": 100.0 * exact_sum / count if count else 0.0,
        "f1": 100.0 * f1_sum / count if count else 0.0,
        "count": count,
        "missing": missing,
    }
    if metric == "cmrc":
        scores["average"] = (scores["exact_match"] + scores["f1"]) / 2
    return scores


def _score_squad_v2(
    entries: Sequence[tuple[str, str | None, Sequence[str]]],
    no_answer_probs: Mapping[str, float] | None,
    threshold: float,
) -> dict[str, Any]:
    # Keyed by id as the v2.0 script does: a later entry with the same id replaces the earlier one.
    by_id: dict[str, tuple[str | None, list[str]]] = {}
    for qid, prediction, references in entries:
        by_id[qid] = (prediction, _as_references(references))
    has_answer = {qid: bool(refs) for qid, (_, refs) in by_id.items()}
    raw_exact: dict[str, float] = {}
    raw_f1: dict[str, float] = {}
    for qid, (prediction, refs) in by_id.items():
        if prediction is None:
            raw_exact[qid] = raw_f1[qid] = 0.0
        else:
            raw_exact[qid], raw_f1[qid] = squad_v2_exact(prediction, refs), squad_v2_f1(prediction, refs)
    predictions = {qid: p for qid, (p, _) in by_id.items() if p is not None}
    exact, f1_scores = raw_exact, raw_f1
    if no_answer_probs is not None:
        unscored = [qid for qid in predictions if qid not in no_answer_probs]
        if unscored:
            raise ValueError(f"no no-answer probability for question id {unscored[0]!r} "
                             f"({len(unscored)} predicted questions lack one)")

        def thresholded(scores: dict[str, float]) -> dict[str, float]:
            return {qid: float(not has_answer[qid]) if qid in predictions and no_answer_probs[qid] > threshold
                    else value for qid, value in scores.items()}

        exact, f1_scores = thresholded(raw_exact), thresholded(raw_f1)

    def summary(ids: list[str]) -> dict[str, float]:
        n = len(ids)
        return {"exact_match": 100.0 * sum(exact[q] for q in ids) / n if n else 0.0,
                "f1": 100.0 * sum(f1_scores[q] for q in ids) / n if n else 0.0}

    out: dict[str, Any] = {**summary(list(by_id)), "count": len(by_id),
                           "missing": len(by_id) - len(predictions), "duplicate_ids": len(entries) - len(by_id)}
    for group, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [qid for qid, has in has_answer.items() if has is wanted]
        if ids:
            for key, value in summary(ids).items():
                out[f"{group}_{key}"] = value
            out[f"{group}_count"] = len(ids)
    if no_answer_probs is not None:
        for key, raw in (("exact_match", raw_exact), ("f1", raw_f1)):
            best, best_threshold = _best_threshold(predictions, raw, no_answer_probs, has_answer)
            out[f"best_{key}"] = best
            out[f"best_{key}_thresh"] = best_threshold
    return out


def _best_threshold(predictions: Mapping[str, str], scores: Mapping[str, float],
                    no_answer_probs: Mapping[str, float], has_answer: Mapping[str, bool]) -> tuple[float, float]:
    """The v2.0 script's find_best_thresh: walk the questions by rising no-answer probability."""
    best = current = float(sum(1 for has in has_answer.values() if not has))
    best_threshold = 0.0
    for qid in sorted(no_answer_probs, key=lambda k: no_answer_probs[k]):  # stable, as the script's sort
        if qid not in scores or qid not in predictions:
            continue
        if has_answer[qid]:
            current += scores[qid]
        else:
            current += -1 if predictions[qid] else 0
        if current > best:
            best, best_threshold = current, no_answer_probs[qid]
    return (100.0 * best / len(scores) if scores else 0.0), best_threshold


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
