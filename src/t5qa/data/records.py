"""The record every stage passes on (`QAExample`) and the parsing of answer cells and flat records into it.

Answer cells come in many shapes: a string, a list, a SQuAD-style `{"text": [...], "answer_start": [...]}`
dict, or such a list or dict written as a string in a CSV cell. `parse_answers` turns any of them into
(texts, starts); `records_to_examples` maps a format's rows (already parsed by `t5qa.data.readers`) through the
column mapping of `DataConfig`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t5qa.config import DataConfig
from t5qa.errors import DataError

FORMATS = ("squad", "json", "jsonl", "csv", "tsv", "parquet", "hf", "hf_disk", "pubmedqa", "qed")
# Column names recognised without flags, in order of preference.
DEFAULT_COLUMNS = {
    "context": ("context",),
    "question": ("question",),
    "answer": ("answers", "answer"),
    "id": ("id",),
}
_START_COLUMNS = ("answer_starts", "answer_start")
_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_MAX_EXAMPLE_SOURCES = 5
# Whitespace runs that normalisation shortens: two or more characters, or any run at either end. (A single
# inner whitespace character becomes one space, which moves no offset.)
_SHORTENED_WHITESPACE = re.compile(r"\s{2,}|\A\s|\s\Z")


@dataclass(frozen=True)
class QAExample:
    """One question about one context, with its reference answers."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    """Reference answers, possibly several; () means the question has no answer in the context."""
    answer_starts: tuple[int, ...]
    """Character offset of each answer in the context; -1 when unknown or not found."""
    source: str = ""
    """Where the example came from ("path:row 5 (line 6)", "path:data[3].paragraphs[1].qas[0]"), for messages."""

    @property
    def is_answerable(self) -> bool:
        """Whether the question has at least one reference answer."""
        return len(self.answers) > 0




# ------------------------------------------------------------------------------------------ answer parsing


MISSING_ANSWER = (("",), (-1,))  # an absent answer cell: cleaning drops it as empty_answer
NO_ANSWER: tuple[tuple[str, ...], tuple[int, ...]] = ((), ())


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _literal(text: str) -> Any:
    """Parse a JSON-ish literal ("['a', 'b']", '["a"]', "{'text': [...]}"), or None when it is not one."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def as_start(value: Any) -> int:
    if isinstance(value, bool) or is_missing(value):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as infinity
        return -1


def parse_answers(
    value: Any, starts: Any, no_answer: frozenset[str]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Turn one answer cell (string, list, SQuAD-style dict, JSON-ish string) into (texts, starts)."""
    if is_missing(value):
        return MISSING_ANSWER
    if isinstance(value, str):
        stripped = value.strip()
        if stripped in no_answer:
            return NO_ANSWER
        if (stripped[:1], stripped[-1:]) in (("[", "]"), ("{", "}")):
            parsed = _literal(stripped)
            # Only lists of strings/records (or a SQuAD-style dict) are answer lists; "[1]" stays text.
            if isinstance(parsed, dict) or (
                isinstance(parsed, list) and all(isinstance(item, (str, dict)) for item in parsed)
            ):
                return parse_answers(parsed, starts, no_answer)
        return (value,), (_first_start(starts),)
    if isinstance(value, dict):
        texts = value.get("text", value.get("texts"))
        dict_starts = value.get("answer_start", value.get("answer_starts", starts))
        if isinstance(texts, (list, tuple)):
            return parse_answers(list(texts), dict_starts, no_answer)
        if texts is None:
            return MISSING_ANSWER
        return parse_answers(str(texts), dict_starts, no_answer)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from parquet/pandas
    if isinstance(value, (list, tuple)):
        if not value:
            return NO_ANSWER  # an explicit empty list (SQuAD v2 / HF "answers": {"text": []})
        start_list = starts if isinstance(starts, (list, tuple)) and len(starts) == len(value) else None
        texts_out: list[str] = []
        starts_out: list[int] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                text = item.get("text")
                start = as_start(item.get("answer_start", -1))
            else:
                text = item
                start = as_start(start_list[i]) if start_list else -1
            text = "" if is_missing(text) else str(text)
            if text.strip() in no_answer:
                continue
            texts_out.append(text)
            starts_out.append(start)
        if not texts_out:
            return NO_ANSWER
        return tuple(texts_out), tuple(starts_out)
    return (str(value),), (_first_start(starts),)


def _first_start(starts: Any) -> int:
    if isinstance(starts, (list, tuple)):
        return as_start(starts[0]) if len(starts) == 1 else -1
    if isinstance(starts, str):
        parsed = _literal(starts.strip()) if starts.strip()[:1] == "[" else starts
        return _first_start(parsed) if isinstance(parsed, list) else as_start(parsed)
    return as_start(starts)


def id_text(value: Any) -> str:
    try:
        return str(value)
    except ValueError:  # an integer id too long to print (over 4300 digits)
        return f"<id of {value.bit_length()} bits>" if isinstance(value, int) else repr(value)[:50]


def text_of(value: Any) -> str:
    if is_missing(value):
        return ""
    return value if isinstance(value, str) else str(value)


# ------------------------------------------------------------------------------------------- flat records


def _resolve_columns(columns: Sequence[str], config: DataConfig, where: str,
                     require_answers: bool = True) -> dict[str, str | None]:
    """Map roles (context, question, answer, id, start) to column names, reporting every missing one at once.

    Without `require_answers` (questions to answer, not to train or score on), the answer column is optional.
    """
    available = list(columns)
    lower = {c.lower(): c for c in available}
    chosen: dict[str, str | None] = {}
    problems = []
    for role, flag_value in (
        ("context", config.context_column),
        ("question", config.question_column),
        ("answer", config.answer_column),
        ("id", config.id_column),
    ):
        flag = f"--{role}-column"
        if flag_value is not None:
            if flag_value not in available:
                problems.append(f"{flag} {flag_value!r} is not a column")
            chosen[role] = flag_value
            continue
        found = next((lower[c] for c in DEFAULT_COLUMNS[role] if c in lower), None)
        if found is None and role != "id" and (role != "answer" or require_answers):
            names = " or ".join(repr(c) for c in DEFAULT_COLUMNS[role])
            problems.append(f"no {role} column (looked for {names}; pass {flag} NAME)")
        chosen[role] = found
    if problems:
        # repr() for names with line breaks or control characters, so the message stays one line.
        shown = ", ".join(c if c.isprintable() else repr(c) for c in available[:40])
        shown += ", ..." if len(available) > 40 else ""
        raise DataError(f"{where}: {'; '.join(problems)}; available columns: {shown}")
    # Offsets travel with plain-string answers in our own JSONL (answer_starts) and in flat SQuAD exports.
    chosen["start"] = next((lower[c] for c in _START_COLUMNS if c in lower), None)
    return chosen


def records_to_examples(
    rows: Iterable[tuple[str, dict[str, Any]]], columns: Sequence[str], config: DataConfig, where: str,
    require_answers: bool = True,
) -> list[QAExample]:
    """Build examples from (location, record) pairs; `location` is e.g. "row 5 (line 6)" or "line 3"."""
    rows = list(rows)
    if not rows:
        return []  # reported as an empty dataset, which says more than "no context column"
    cols = _resolve_columns(columns, config, where, require_answers)
    no_answer = frozenset(config.no_answer_values)
    c_ctx, c_q, c_a, c_id, c_start = cols["context"], cols["question"], cols["answer"], cols["id"], cols["start"]
    examples = []
    for number, (location, row) in enumerate(rows, start=1):
        if c_a is None:  # questions only: nothing to learn from or score against
            texts, starts = NO_ANSWER
        else:
            texts, starts = parse_answers(row.get(c_a), row.get(c_start) if c_start else None, no_answer)
        raw_id = row.get(c_id) if c_id else None
        examples.append(
            QAExample(
                id=str(number) if is_missing(raw_id) or raw_id == "" else id_text(raw_id),
                context=text_of(row.get(c_ctx)),
                question=text_of(row.get(c_q)),
                answers=texts,
                answer_starts=starts,
                source=f"{where}:{location}",
            )
        )
    return examples



def write_jsonl(examples: Iterable[QAExample], path: str | Path) -> None:
    """Write examples as JSON lines ({"id","context","question","answers","answer_starts"}), readable back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for ex in examples:
            row = {"id": ex.id, "context": ex.context, "question": ex.question,
                   "answers": list(ex.answers), "answer_starts": list(ex.answer_starts)}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

