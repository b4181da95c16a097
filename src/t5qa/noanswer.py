"""A calibrated "no answer": when to return the empty answer on data with unanswerable questions (SQuAD v2.0).

A seq2seq model says "no answer" by generating </s> first. Its own choice is rarely the F1-best one, so for each
question (each window of its context) the Predictor measures a margin:

    margin = score of the best non-empty answer - log p(</s> as the first token)

both as log-probability per generated token, and answers only when the margin reaches a threshold. The threshold is
chosen on validation data the way the SQuAD v2.0 script's `find_best_thresh` chooses its no-answer probability
threshold: walk the questions from the most to the least confident, and keep the cut with the best total F1 (an
unanswerable question scores 1 when left empty, an answerable one its answer's F1 when answered). It is saved with the
model (t5qa.json `no_answer`) and applied by predict, evaluate and serve unless overridden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

META_KEY = "no_answer"
# Thresholds outside the margins seen: "answer every question" and "answer none" (JSON has no infinity).
EDGE = 1.0


@dataclass
class NoAnswerCalibration:
    """A threshold chosen on one evaluation, with the F1 it gives there."""

    threshold: float
    """Answer when margin >= threshold (margins in log-probability per token)."""
    chosen_on: str
    """Which data it was chosen on, and how many questions."""
    before: dict[str, float]
    """f1, exact_match, HasAns_f1 and NoAns_f1 (0-100) of the model's own answers."""
    after: dict[str, float]
    """The same with the threshold applied (on the data it was chosen on: an optimistic figure)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: the threshold and F1 overall, on answerable and on unanswerable questions, before and after."""
        def part(key: str, label: str) -> str:
            if key not in self.before:
                return ""
            return f", {label} {self.before[key]:.2f} -> {self.after[key]:.2f}"
        return (f"no-answer threshold {self.threshold:.4g} (chosen on {self.chosen_on}): F1 {self.before['f1']:.2f} -> "
                f"{self.after['f1']:.2f}{part('HasAns_f1', 'HasAns F1')}{part('NoAns_f1', 'NoAns F1')}")


def choose_threshold(margins: Sequence[float], answer_scores: Sequence[float], answerable: Sequence[bool]
                     ) -> tuple[float, float]:
    """The F1-best threshold and the mean score (0-1) it gives.

    Args:
        margins: each question's margin (non-empty answer's score minus the empty answer's).
        answer_scores: each question's score (F1 or EM, 0-1) when it is answered with its non-empty answer (0 for
            an unanswerable question under SQuAD v2.0's scoring).
        answerable: whether each question has a reference answer (an unanswerable one scores 1 when left empty).
    Returns:
        (threshold, score): answering exactly the questions with margin >= threshold scores `score`, the best any
        threshold can; the threshold lies halfway between the margins on either side of the cut (EDGE beyond the
        outermost). Ties in margin are answered together, as one threshold must.
    """
    if not (len(margins) == len(answer_scores) == len(answerable)):
        raise ValueError("margins, answer_scores and answerable must have one entry per question")
    n = len(margins)
    if n == 0:
        return EDGE, 0.0
    if any(not math.isfinite(m) for m in margins):
        raise ValueError("every margin must be a finite number")
    order = sorted(range(n), key=lambda i: -margins[i])
    current = float(sum(1 for a in answerable if not a))  # nothing answered: every unanswerable one is right
    best, best_cut = current, 0  # best_cut: how many of the most confident questions are answered
    for position, i in enumerate(order):
        current += answer_scores[i] - (0.0 if answerable[i] else 1.0)  # answered instead of left empty
        tied_with_next = position + 1 < n and margins[order[position + 1]] == margins[i]
        if not tied_with_next and current > best:
            best, best_cut = current, position + 1
    if best_cut == 0:
        threshold = margins[order[0]] + EDGE
    elif best_cut == n:
        threshold = margins[order[-1]] - EDGE
    else:
        threshold = (margins[order[best_cut - 1]] + margins[order[best_cut]]) / 2
    return threshold, best / n


def apply_threshold(candidate: str, margin: float | None, threshold: float | None) -> str:
    """The answer to return: the non-empty candidate when its margin reaches the threshold, else ""."""
    if threshold is None or margin is None:
        return candidate
    return candidate if margin >= threshold else ""


def read_threshold(meta: dict[str, Any]) -> float | None:
    """The threshold saved with a model (t5qa.json), or None."""
    saved = meta.get(META_KEY)
    value = saved.get("threshold") if isinstance(saved, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
