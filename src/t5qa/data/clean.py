"""Cleaning: normalise, repair, flag and drop examples, counting every step per reason in a `CleaningReport`.

Nothing is dropped silently. `load_dataset` is read-then-clean for training; `load_for_evaluation` reads
reference data for the official scorers, which count every entry, so it normalises inputs but drops nothing.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t5qa.config import DataConfig
from t5qa.data.readers import load_examples
from t5qa.data.records import QAExample
from t5qa.errors import DataError

logger = logging.getLogger(__name__)

_MAX_EXAMPLE_SOURCES = 5
# Whitespace runs that normalisation shortens: two or more characters, or any run at either end. (A single
# inner whitespace character becomes one space, which moves no offset.)
_SHORTENED_WHITESPACE = re.compile(r"\s{2,}|\A\s|\s\Z")


@dataclass
class CleaningReport:
    """What cleaning did: counts per reason, and up to five example sources per reason."""

    total_in: int = 0
    total_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> examples removed (empty_context, empty_question, empty_answer, duplicate, ...)."""
    flagged: dict[str, int] = field(default_factory=dict)
    """Reason -> examples kept but noteworthy (unanswerable, answer_not_in_context, answer_too_long)."""
    normalised: dict[str, int] = field(default_factory=dict)
    """Reason -> examples changed in place (whitespace, unicode_nfc, answer_start_repaired, ...)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> up to five sources of affected examples."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return {
            "total_in": self.total_in,
            "total_out": self.total_out,
            "dropped": dict(sorted(self.dropped.items())),
            "flagged": dict(sorted(self.flagged.items())),
            "normalised": dict(sorted(self.normalised.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    def _count(self, bucket: dict[str, int], reason: str, example: QAExample) -> None:
        bucket[reason] = bucket.get(reason, 0) + 1
        sources = self.examples.setdefault(reason, [])
        if len(sources) < _MAX_EXAMPLE_SOURCES:
            sources.append(example.source or example.id)



# -------------------------------------------------------------------------------------------------- cleaning


# Lone UTF-16 surrogates (from JSON escapes such as "\\ud800") cannot be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fix_surrogates(text: str) -> tuple[str, bool]:
    """Replace lone surrogates with U+FFFD (same length, so offsets stay valid)."""
    if _SURROGATE.search(text) is None:
        return text, False
    return _SURROGATE.sub("\ufffd", text), True


class _Normalised:
    """A context after NFC and whitespace normalisation, with a map from old to new character offsets."""

    __slots__ = ("original", "nfc", "text", "nfc_changed", "surrogates", "_run_ends", "_removed", "_squeezed")

    def __init__(self, original: str) -> None:
        original, self.surrogates = _fix_surrogates(original)
        self.original = original
        self.nfc_changed = not unicodedata.is_normalized("NFC", original)
        self.nfc = unicodedata.normalize("NFC", original) if self.nfc_changed else original
        # Collapse every whitespace run to one space and strip the ends; record, for each run, where it ends in
        # the NFC text and how many characters were removed up to there, so offsets map by binary search.
        run_ends: list[int] = []
        removed: list[int] = []
        total = 0
        length = len(self.nfc)
        for match in _SHORTENED_WHITESPACE.finditer(self.nfc):
            start, end = match.span()
            keep = 0 if start == 0 or end == length else 1
            total += (end - start) - keep
            run_ends.append(end)
            removed.append(total)
        self._run_ends = run_ends
        self._removed = removed
        self.text = " ".join(self.nfc.split())
        self._squeezed: tuple[str, list[int]] | None = None  # built on first use: most answers match directly

    def find_ignoring_spaces(self, answer: str, near: int) -> tuple[int, int] | None:
        """(start, end) in `text` of a span equal to `answer` once spaces are removed from both, or None."""
        if self._squeezed is None:
            positions = [i for i, ch in enumerate(self.text) if ch != " "]
            self._squeezed = ("".join(self.text[i] for i in positions), positions)
        squeezed, positions = self._squeezed
        needle = answer.replace(" ", "")
        found = _nearest(squeezed, needle, near) if needle else -1
        if found == -1:
            return None
        return positions[found], positions[found + len(needle) - 1] + 1

    def map_offset(self, offset: int) -> int:
        """New offset of a character at `offset` in the original (a non-whitespace character)."""
        if self.nfc_changed:
            # NFC may compose characters; the prefix length is exact at character boundaries.
            offset = len(unicodedata.normalize("NFC", self.original[:offset]))
        i = bisect.bisect_right(self._run_ends, offset) - 1
        return offset - (self._removed[i] if i >= 0 else 0)


def _normalise_text(text: str) -> tuple[str, bool, bool]:
    """(normalised text, NFC (or a surrogate fix) changed it, whitespace normalisation changed it)."""
    text, _ = _fix_surrogates(text)
    nfc = unicodedata.normalize("NFC", text)
    collapsed = " ".join(nfc.split())
    return collapsed, nfc != text, collapsed != nfc


def _nearest(haystack: str, needle: str, near: int) -> int:
    """Start of the occurrence of `needle` closest to `near`, or -1."""
    best, best_distance = -1, None
    start = haystack.find(needle)
    while start != -1:
        distance = abs(start - near)
        if best_distance is None or distance < best_distance:
            best, best_distance = start, distance
        if start > near:
            break
        start = haystack.find(needle, start + 1)
    return best


def clean_examples(
    examples: list[QAExample],
    config: DataConfig | None = None,
    *,
    max_answer_tokens: int | None = None,
    tokenizer: Any = None,
) -> tuple[list[QAExample], CleaningReport]:
    """Normalise, repair, flag and drop examples, counting every step per reason.

    Steps: NFC and whitespace normalisation (offsets are mapped to the new text); empty context, question or
    answer (dropped); answer offsets that are off but whose text occurs in the context (repaired to the nearest
    occurrence); offsets found for answers given without one; answers not in the context (flagged, or dropped
    with `drop_answers_not_in_context` when no answer of the question occurs); unanswerable questions (flagged,
    or dropped with `drop_unanswerable`); exact duplicates (dropped); repeated ids (renamed); answers longer
    than `max_answer_tokens` with `tokenizer` (flagged: they will be truncated).

    Returns:
        (kept examples in input order, report).
    """
    config = config or DataConfig()
    report = CleaningReport(total_in=len(examples))
    contexts: dict[str, _Normalised] = {}
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    ids: dict[str, int] = {}
    kept: list[QAExample] = []
    for ex in examples:
        norm = contexts.get(ex.context)
        if norm is None:
            norm = contexts[ex.context] = _Normalised(ex.context)
        question, q_nfc, q_ws = _normalise_text(ex.question)
        nfc_changed = norm.nfc_changed or q_nfc
        ws_changed = norm.text != norm.nfc or q_ws
        context = norm.text
        if not context:
            report._count(report.dropped, "empty_context", ex)
            continue
        if not question:
            report._count(report.dropped, "empty_question", ex)
            continue
        answers: list[str] = []
        starts: list[int] = []
        repaired = located = text_repaired = not_found = removed_empty = False
        for text, start in zip(ex.answers, ex.answer_starts):
            answer, a_nfc, a_ws = _normalise_text(text)
            nfc_changed |= a_nfc
            ws_changed |= a_ws
            if not answer:
                removed_empty = True
                continue
            new_start = -1
            if 0 <= start <= len(ex.context) and ex.context.startswith(text, start):
                lead = len(text) - len(text.lstrip())  # the stripped answer begins after its own whitespace
                new_start = norm.map_offset(start + lead)
                if not context.startswith(answer, new_start):  # pragma: no cover - mapping is exact
                    new_start = _nearest(context, answer, new_start)
            elif start >= 0:
                new_start = _nearest(context, answer, norm.map_offset(min(start, len(ex.context))))
                repaired |= new_start != -1
            else:
                new_start = context.find(answer)
                located |= new_start != -1
            if new_start == -1:
                # Spans copied from tokenised text ("$ 11" for "$11", "I 'll" for "I'll"): take the context's own
                # characters when the answer matches once whitespace is ignored.
                span = norm.find_ignoring_spaces(answer, max(start, 0))
                if span is not None:
                    new_start, end = span
                    answer = context[new_start:end]
                    text_repaired = True
            not_found |= new_start == -1
            answers.append(answer)
            starts.append(new_start)
        if norm.surrogates or any(_SURROGATE.search(t) for t in (ex.id, ex.question, *ex.answers)):
            report._count(report.normalised, "lone_surrogate_replaced", ex)
        if nfc_changed:
            report._count(report.normalised, "unicode_nfc", ex)
        if ws_changed:
            report._count(report.normalised, "whitespace", ex)
        if ex.answers and not answers:
            report._count(report.dropped, "empty_answer", ex)
            continue
        key = (context, question, tuple(answers))
        if key in seen:
            report._count(report.dropped, "duplicate", ex)
            continue
        if not_found and config.drop_answers_not_in_context and all(s == -1 for s in starts):
            report._count(report.dropped, "answer_not_in_context", ex)
            continue
        if not answers and config.drop_unanswerable:
            report._count(report.dropped, "unanswerable", ex)
            continue
        seen.add(key)
        for happened, bucket, reason in (
            (removed_empty, report.normalised, "empty_answer_removed"),
            (repaired, report.normalised, "answer_start_repaired"),
            (located, report.normalised, "answer_start_located"),
            (text_repaired, report.normalised, "answer_text_repaired"),
            (not_found, report.flagged, "answer_not_in_context"),
            (not answers, report.flagged, "unanswerable"),
        ):
            if happened:
                report._count(bucket, reason, ex)
        base_id = _fix_surrogates(ex.id)[0]
        new_id = base_id
        if new_id in ids:
            ids[base_id] += 1
            new_id = f"{base_id}-{ids[base_id]}"
            while new_id in ids:  # the renamed id may itself be taken
                ids[base_id] += 1
                new_id = f"{base_id}-{ids[base_id]}"
            report._count(report.normalised, "duplicate_id_renamed", ex)
        ids.setdefault(new_id, 1)
        kept.append(QAExample(new_id, context, question, tuple(answers), tuple(starts), ex.source))
    if tokenizer is not None and max_answer_tokens is not None:
        _flag_long_answers(kept, tokenizer, max_answer_tokens, report)
    report.total_out = len(kept)
    _log_report(report)
    return kept, report


def _flag_long_answers(examples: list[QAExample], tokenizer: Any, max_answer_tokens: int,
                       report: CleaningReport) -> None:
    owners = [i for i, ex in enumerate(examples) for _ in ex.answers]
    texts = [answer for ex in examples for answer in ex.answers]
    if not texts:
        return
    # Labels carry the end-of-sequence token, so count with special tokens, as training does.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
    too_long = sorted({owners[i] for i, n in enumerate(lengths) if n > max_answer_tokens})
    for i in too_long:
        report._count(report.flagged, "answer_too_long", examples[i])


def _log_report(report: CleaningReport) -> None:
    logger.info("cleaning: %d examples in, %d out", report.total_in, report.total_out)
    for name, bucket in (("dropped", report.dropped), ("flagged", report.flagged),
                         ("normalised", report.normalised)):
        for reason, count in sorted(bucket.items()):
            logger.debug("cleaning: %s %d example(s): %s", name, count, reason)


def load_dataset(source: str | Path | Any, config: DataConfig | None = None, *,
                 max_answer_tokens: int | None = None, tokenizer: Any = None) -> tuple[list[QAExample], CleaningReport]:
    """Load and clean a dataset (see `load_examples` and `clean_examples`).

    Raises:
        DataError: as `load_examples`; also when nothing is left (an empty file, or every example dropped).
    """
    config = config or DataConfig()
    examples = load_examples(source, config)
    where = source if isinstance(source, (str, Path)) else type(source).__name__
    if not examples:
        raise DataError(f"{where}: the dataset is empty (no questions found); check the file and --format")
    kept, report = clean_examples(examples, config, max_answer_tokens=max_answer_tokens, tokenizer=tokenizer)
    if not kept:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(report.dropped.items()))
        raise DataError(f"{where}: all {len(examples)} examples were dropped by cleaning ({reasons}); "
                        "check the column mapping (--context-column, --question-column, --answer-column)")
    return kept, report


def require_inputs(examples: Sequence[QAExample]) -> None:
    """Refuse examples that cannot be answered: an empty (or blank) context or question.

    Raises:
        DataError: naming the first such rows (file and row) and the fix.
    """
    bad = [(ex, "context" if not ex.context.strip() else "question") for ex in examples
           if not ex.context.strip() or not ex.question.strip()]
    if bad:
        first, field_name = bad[0]
        more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
        raise DataError(f"{first.source or first.id}: empty {field_name}{more}; every question needs a non-empty "
                        "context and question: fill them in or remove those rows")


def load_for_evaluation(source: str | Path | Any, config: DataConfig | None = None, *,
                        need_inputs: bool = True) -> list[QAExample]:
    """Read reference data for scoring: every question entry kept, in file order, references as written.

    Unlike `load_dataset`, nothing is dropped, deduplicated or renamed, and answers are not rewritten: the
    official scorers count every entry. Contexts and questions are normalised as in cleaning (NFC, whitespace)
    so the model sees what it was trained on.

    Args:
        need_inputs: the examples will be answered by a model, so an empty context or question is refused.
    Raises:
        DataError: as `load_examples`; an empty dataset; with `need_inputs`, an empty context or question.
    """
    config = config or DataConfig()
    examples = load_examples(source, config)
    where = source if isinstance(source, (str, Path)) else type(source).__name__
    if not examples:
        raise DataError(f"{where}: the dataset is empty (no questions found); check the file and --format")
    if need_inputs:
        require_inputs(examples)
    contexts: dict[str, _Normalised] = {}
    out = []
    for ex in examples:
        norm = contexts.get(ex.context)
        if norm is None:
            norm = contexts[ex.context] = _Normalised(ex.context)
        # Offsets follow the context into its normalised form; the answer texts themselves stay as written.
        starts = []
        for text, start in zip(ex.answers, ex.answer_starts):
            lead = len(text) - len(text.lstrip())
            exact = 0 <= start <= len(ex.context) and text.strip() and ex.context.startswith(text, start)
            starts.append(norm.map_offset(start + lead) if exact else -1)
        out.append(dataclasses.replace(ex, context=norm.text, question=_normalise_text(ex.question)[0],
                                       answer_starts=tuple(starts)))
    return out


# -------------------------------------------------------------------------------------------------- splitting
