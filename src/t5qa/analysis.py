"""Error analysis: exact match and F1 broken down by what the examples are like.

`breakdown(rows)` takes evaluate's per-example rows (each with exact_match and f1 from the official scorer's
per-pair definitions, and the fields below) and gives, per dimension, each bucket's count, mean EM and F1 (0-100)
and its worst examples. In every dimension each row falls in exactly one bucket, so the counts add up to the
number of rows; rows that lack a field (predictions files scored without a model) go to an "unknown" bucket.

Dimensions:
- context length, in characters (so that Chinese and English read alike);
- answer length, in the CMRC mixed segments (a Chinese character or an English word each) of the first reference;
- question word: what/which/who/when/where/why/how many/how, and 什么/哪/谁/何时/哪里/多少/为什么
  (else "other");
- answer position: where the first reference answer starts, as a quarter of the context;
- window: which window of a long context the answer was generated from;
- answer in input: whether the generating window held a reference answer;
- prediction: empty or not.

The means are over rows (one per question in the reference data), as the SQuAD v1.1 and CMRC scripts count;
squad_v2's own totals key by id, so with repeated ids its headline figures can differ from the rows' mean.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from t5qa.metrics import mixed_segmentation

UNKNOWN = "unknown"
WORST_PER_BUCKET = 3

# English question words, longest first; matched as whole words, the first in the question wins.
_ENGLISH = (("how many", "how many"), ("how much", "how many"), ("what", "what"), ("which", "which"),
            ("who", "who"), ("whom", "who"), ("whose", "who"), ("when", "when"), ("where", "where"),
            ("why", "why"), ("how", "how"))
# Chinese question words (no word boundaries in Chinese), the more specific ones first.
_CHINESE = (("为什么", "why"), ("为何", "why"), ("什么时候", "when"), ("何时", "when"), ("哪一年", "when"),
            ("哪里", "where"), ("哪儿", "where"), ("何地", "where"), ("多少", "how many"), ("几", "how many"),
            ("谁", "who"), ("哪", "which"), ("什么", "what"), ("怎么", "how"), ("如何", "how"))
_ENGLISH_RE = re.compile(r"\b(" + "|".join(re.escape(word) for word, _ in _ENGLISH) + r")\b", re.IGNORECASE)
_ENGLISH_LABEL = {word: label for word, label in _ENGLISH}
# The label a Chinese question word maps to, shown with both languages' words.
_LABELS = {"what": "what / 什么", "which": "which / 哪", "who": "who / 谁", "when": "when / 何时",
           "where": "where / 哪里", "why": "why / 为什么", "how many": "how many / 多少", "how": "how / 怎么"}


def question_word(question: str) -> str:
    """The question's question word, as a label naming the English and the Chinese word; "other" if none."""
    for word, label in _CHINESE:
        if word in question:
            return _LABELS[label]
    match = _ENGLISH_RE.search(question)
    return _LABELS[_ENGLISH_LABEL[match.group(1).lower()]] if match else "other"


def _bucket(value: float | None, edges: Sequence[float], names: Sequence[str]) -> str:
    if value is None:
        return UNKNOWN
    for edge, name in zip(edges, names):
        if value < edge:
            return name
    return names[-1]


def _context_length(row: dict[str, Any]) -> str:
    return _bucket(row.get("context_chars"), (500, 1000, 2000, 4000),
                   ("< 500 chars", "500-999", "1,000-1,999", "2,000-3,999", ">= 4,000"))


def _answer_length(row: dict[str, Any]) -> str:
    references = row.get("references")
    if not isinstance(references, list):
        return UNKNOWN
    if not references or not str(references[0]).strip():
        return "no answer"
    return _bucket(len(mixed_segmentation(str(references[0]), remove_punctuation=False)), (2, 4, 7, 11),
                   ("1 segment", "2-3", "4-6", "7-10", ">= 11"))


def _answer_position(row: dict[str, Any]) -> str:
    position = row.get("answer_position")
    if position is None:
        return "no answer" if row.get("references") == [] else UNKNOWN
    return _bucket(position, (0.25, 0.5, 0.75), ("first quarter", "second quarter", "third quarter",
                                                 "last quarter"))


def _window(row: dict[str, Any]) -> str:
    window = row.get("window")
    if not isinstance(window, int):
        return UNKNOWN
    return {0: "window 1", 1: "window 2", 2: "window 3"}.get(window, "window 4 or later")


def _answer_in_input(row: dict[str, Any]) -> str:
    value = row.get("answer_in_input")
    return UNKNOWN if value is None else ("yes" if value else "no")


def _prediction(row: dict[str, Any]) -> str:
    return "empty" if not str(row.get("prediction") or "").strip() else "non-empty"


DIMENSIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "context length": _context_length,
    "answer length": _answer_length,
    "question word": lambda row: question_word(str(row.get("question", ""))),
    "answer position": _answer_position,
    "window": _window,
    "answer in input": _answer_in_input,
    "prediction": _prediction,
}


def breakdown(rows: Sequence[dict[str, Any]], *, worst: int = WORST_PER_BUCKET) -> dict[str, list[dict[str, Any]]]:
    """Per dimension, its buckets in a fixed order (largest first, "unknown" last), each as
    {"bucket", "count", "exact_match", "f1", "worst": [the `worst` lowest-F1 rows' id, question, prediction,
    references, f1]}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, bucket_of in DIMENSIONS.items():
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(bucket_of(row), []).append(row)
        buckets = []
        for bucket, members in sorted(groups.items(), key=lambda kv: (kv[0] == UNKNOWN, -len(kv[1]), kv[0])):
            ranked = sorted(members, key=lambda r: float(r.get("f1") or 0.0))  # stable: input order among ties
            buckets.append({
                "bucket": bucket,
                "count": len(members),
                "exact_match": 100.0 * sum(float(r.get("exact_match") or 0.0) for r in members) / len(members),
                "f1": 100.0 * sum(float(r.get("f1") or 0.0) for r in members) / len(members),
                "worst": [{key: r.get(key) for key in ("id", "question", "prediction", "references", "f1")}
                          for r in ranked[:worst]],
            })
        out[name] = buckets
    return out
