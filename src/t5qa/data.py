"""Load question-answer data from any supported format into `QAExample` records, clean it, and split it.

Supported sources (detected from the content; `DataConfig.format` overrides):
- `squad`: SQuAD v1.1 / v2.0 nested JSON (`data[].paragraphs[].qas[]`); v2 `is_impossible` questions are kept as
  unanswerable;
- `json` (a list of records or `{"data": [...]}`), `jsonl`, `csv`, `tsv`, `parquet`: flat records whose columns
  are mapped with `DataConfig.*_column` (by default `context`, `question`, `answer`/`answers`, `id`);
- `pubmedqa`: PubMedQA's dict of id -> {QUESTION, CONTEXTS, LONG_ANSWER};
- `qed`: QED's own JSON lines (paragraph_text, question_text, original_nq_answers spans);
- `hf`: a `datasets` Dataset/DatasetDict saved with `save_to_disk`, or a Hugging Face Hub dataset name.

Cleaning (`clean_examples`) never drops anything silently: every change, drop and flag is counted per reason in a
`CleaningReport`. Splitting (`split_examples`) groups questions by context, so no context is in two splits.
"""

from __future__ import annotations

import ast
import bisect
import csv
import dataclasses
import io
import json
import logging
import math
import random
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t5qa.config import DataConfig
from t5qa.errors import DataError

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------- reading


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path")
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory but not a `datasets` save_to_disk folder (no dataset_info.json, state.json "
            "or dataset_dict.json); pass a data file"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


def _decode(path: Path, raw: bytes) -> str:
    try:
        # utf-8-sig also accepts UTF-8 with a byte-order mark, which Excel writes.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(
            f"{path}: line {line}: not UTF-8 text{hint} (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"convert it to UTF-8, e.g. `iconv -f LATIN1 -t UTF-8 {path.name} > fixed.{path.suffix.lstrip('.') or 'txt'}`"
        ) from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the file there "
            "(a JSON-lines file needs one complete object per line)"
        ) from None
    except (ValueError, RecursionError) as exc:  # numbers over 4300 digits; nesting deeper than Python's stack
        raise DataError(f"{path}: unreadable JSON ({_short(exc)}); QA data needs no such values, fix the file") from None


def _short(exc: BaseException) -> str:
    return str(exc).split(";")[0][:120]


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    rows = []
    # Only "\n" ends a JSON line: str.splitlines() would also split at U+2028 and friends inside strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {line_number}, column {exc.colno}: invalid JSON ({exc.msg}); "
                "each line of a JSON-lines file must be one complete JSON object"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}: line {line_number}: unreadable JSON ({_short(exc)}); fix that line") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: line {line_number}: expected a JSON object with named fields, got {type(record).__name__}"
            )
        rows.append((line_number, record))
    return rows


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _looks_like_jsonl(text: str) -> bool:
    lines = [line for line in text.split("\n", 3)[:3] if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _json_shape(obj: Any) -> str | None:
    """The format of a parsed JSON document, or None when it is not one we read."""
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        first = obj["data"][0] if obj["data"] else None
        if isinstance(first, dict) and "paragraphs" in first:
            return "squad"
        return "json"
    if isinstance(obj, list):
        return "json"
    if isinstance(obj, dict) and obj:
        first = next(iter(obj.values()))
        if isinstance(first, dict) and "QUESTION" in first and "CONTEXTS" in first:
            return "pubmedqa"
    return None


def _detect(path: Path) -> tuple[str, Any]:
    """Detect the format of a local path; returns (format, parsed JSON or text or None) to avoid reading twice."""
    if _is_hf_disk(path):
        return "hf_disk", None
    raw = _read_bytes(path)
    if path.suffix.lower() == ".parquet" or raw[:4] == b"PAR1":
        return "parquet", None
    text = _decode(path, raw)
    head = text.lstrip()[:1]
    suffix = path.suffix.lower()
    if head in ("{", "[") and suffix not in (".csv", ".tsv"):
        if suffix in _JSONL_SUFFIXES or _looks_like_jsonl(text):
            return "jsonl", text
        obj = _parse_json(path, text)
        shape = _json_shape(obj)
        if shape is None and isinstance(obj, dict) and "\n" not in text.strip():
            return "jsonl", text  # a JSON-lines file holding a single record
        if shape is None:
            raise DataError(
                f"{path}: JSON of an unknown shape (top level {type(obj).__name__}); expected SQuAD "
                '({"data": [{"paragraphs": ...}]}), a list of records, or {"data": [records]}'
            )
        return shape, obj
    if suffix == ".tsv":
        return "tsv", text
    if suffix == ".csv":
        return "csv", text
    first_line = text.split("\n", 1)[0]
    if "\t" in first_line and first_line.count("\t") >= first_line.count(","):
        return "tsv", text
    if "," in first_line:
        return "csv", text
    raise DataError(
        f"{path}: cannot tell the format from the content; pass --format (one of {', '.join(FORMATS)})"
    )


def detect_format(path: str | Path) -> str:
    """Detect the format of a data file or folder from its content.

    Returns:
        One of "squad", "json", "jsonl", "csv", "tsv", "parquet", "hf_disk", "pubmedqa".
    Raises:
        DataError: the path is missing, unreadable, not UTF-8, or of no recognisable format.
    """
    return _detect(Path(path))[0]


# ------------------------------------------------------------------------------------------ answer parsing


_MISSING = (("",), (-1,))  # an absent answer cell: cleaning drops it as empty_answer
_NO_ANSWER: tuple[tuple[str, ...], tuple[int, ...]] = ((), ())


def _is_missing(value: Any) -> bool:
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


def _as_start(value: Any) -> int:
    if isinstance(value, bool) or _is_missing(value):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as infinity
        return -1


def _parse_answers(
    value: Any, starts: Any, no_answer: frozenset[str]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Turn one answer cell (string, list, SQuAD-style dict, JSON-ish string) into (texts, starts)."""
    if _is_missing(value):
        return _MISSING
    if isinstance(value, str):
        stripped = value.strip()
        if stripped in no_answer:
            return _NO_ANSWER
        if (stripped[:1], stripped[-1:]) in (("[", "]"), ("{", "}")):
            parsed = _literal(stripped)
            # Only lists of strings/records (or a SQuAD-style dict) are answer lists; "[1]" stays text.
            if isinstance(parsed, dict) or (
                isinstance(parsed, list) and all(isinstance(item, (str, dict)) for item in parsed)
            ):
                return _parse_answers(parsed, starts, no_answer)
        return (value,), (_first_start(starts),)
    if isinstance(value, dict):
        texts = value.get("text", value.get("texts"))
        dict_starts = value.get("answer_start", value.get("answer_starts", starts))
        if isinstance(texts, (list, tuple)):
            return _parse_answers(list(texts), dict_starts, no_answer)
        if texts is None:
            return _MISSING
        return _parse_answers(str(texts), dict_starts, no_answer)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from parquet/pandas
    if isinstance(value, (list, tuple)):
        if not value:
            return _NO_ANSWER  # an explicit empty list (SQuAD v2 / HF "answers": {"text": []})
        start_list = starts if isinstance(starts, (list, tuple)) and len(starts) == len(value) else None
        texts_out: list[str] = []
        starts_out: list[int] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                text = item.get("text")
                start = _as_start(item.get("answer_start", -1))
            else:
                text = item
                start = _as_start(start_list[i]) if start_list else -1
            text = "" if _is_missing(text) else str(text)
            if text.strip() in no_answer:
                continue
            texts_out.append(text)
            starts_out.append(start)
        if not texts_out:
            return _NO_ANSWER
        return tuple(texts_out), tuple(starts_out)
    return (str(value),), (_first_start(starts),)


def _first_start(starts: Any) -> int:
    if isinstance(starts, (list, tuple)):
        return _as_start(starts[0]) if len(starts) == 1 else -1
    if isinstance(starts, str):
        parsed = _literal(starts.strip()) if starts.strip()[:1] == "[" else starts
        return _first_start(parsed) if isinstance(parsed, list) else _as_start(parsed)
    return _as_start(starts)


def _id_text(value: Any) -> str:
    try:
        return str(value)
    except ValueError:  # an integer id too long to print (over 4300 digits)
        return f"<id of {value.bit_length()} bits>" if isinstance(value, int) else repr(value)[:50]


def _text(value: Any) -> str:
    if _is_missing(value):
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


def _records_to_examples(
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
            texts, starts = _NO_ANSWER
        else:
            texts, starts = _parse_answers(row.get(c_a), row.get(c_start) if c_start else None, no_answer)
        raw_id = row.get(c_id) if c_id else None
        examples.append(
            QAExample(
                id=str(number) if _is_missing(raw_id) or raw_id == "" else _id_text(raw_id),
                context=_text(row.get(c_ctx)),
                question=_text(row.get(c_q)),
                answers=texts,
                answer_starts=starts,
                source=f"{where}:{location}",
            )
        )
    return examples


def _read_delimited(path: Path, text: str, delimiter: str, config: DataConfig,
                    require_answers: bool = True) -> list[QAExample]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    # Contexts such as whole papers exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"{path}: line 1 (header): malformed {kind} ({exc}); fix the quoting") from None
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{path}: empty {kind} file (no header row); a header row naming the columns is required")
    header = [h.strip() for h in header]
    rows: list[tuple[str, dict[str, Any]]] = []
    line_before = reader.line_num
    row_number = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(
                f"{path}: row {row_number + 1} (line {line_before + 1}): malformed {kind} ({exc}); "
                'check the quoting there (a field containing the delimiter or a newline must be in "double quotes")'
            ) from None
        first_line = line_before + 1
        line_before = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # blank line
        row_number += 1
        if len(cells) != len(header):
            raise DataError(
                f"{path}: row {row_number} (line {first_line}): {len(cells)} fields but the header has "
                f"{len(header)}; check the quoting and the delimiter"
                + (" (is this a TSV file? pass --format tsv)" if delimiter == "," and "\t" in "".join(cells) else "")
            )
        rows.append((f"row {row_number} (line {first_line})", dict(zip(header, cells))))
    return _records_to_examples(rows, header, config, str(path), require_answers)


def _union_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def _read_json_records(path: Path, obj: Any, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    records = obj["data"] if isinstance(obj, dict) else obj
    prefix = "data" if isinstance(obj, dict) else ""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: {prefix}[{i}]: expected a JSON object with named fields, got {type(record).__name__}"
            )
    rows = [(f"{prefix}[{i}]", record) for i, record in enumerate(records)]
    return _records_to_examples(rows, _union_keys(records), config, str(path), require_answers)


_QED_KEYS = {"paragraph_text", "question_text", "original_nq_answers"}


def _read_jsonl(path: Path, text: str, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    parsed = _parse_jsonl(path, text)
    if config.format == "qed" or (config.format is None and parsed and _QED_KEYS <= parsed[0][1].keys()
                                  and config.context_column is None):
        return _read_qed(path, parsed)
    rows = [(f"line {n}", record) for n, record in parsed]
    return _records_to_examples(rows, _union_keys(r for _, r in parsed), config, str(path), require_answers)


def _read_parquet(path: Path, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); re-export it") from None
    records = table.to_pylist()
    rows = [(f"row {i}", record) for i, record in enumerate(records, start=1)]
    return _records_to_examples(rows, table.column_names, config, str(path), require_answers)


# --------------------------------------------------------------------------------------------- SQuAD & co.


def _read_squad(path: Path, obj: Any, require_answers: bool = True) -> list[QAExample]:
    """Read SQuAD v1.1/v2.0 nested JSON, naming the JSON path of the first shape problems."""
    problems: list[str] = []
    examples: list[QAExample] = []

    def problem(where: str, what: str) -> None:
        problems.append(f"{where}: {what}")

    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list):
        raise DataError(f'{path}: SQuAD JSON needs a top-level "data" list')
    for a, article in enumerate(data):
        where_a = f"data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            problem(where_a, 'missing "paragraphs" list')
            continue
        for p, paragraph in enumerate(article["paragraphs"]):
            where_p = f"{where_a}.paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                problem(where_p, f"expected an object, got {type(paragraph).__name__}")
                continue
            if "context" not in paragraph:
                problem(where_p, 'missing "context"')
                continue
            if not isinstance(paragraph.get("qas"), list):
                problem(where_p, 'missing "qas" list')
                continue
            context = _text(paragraph["context"])
            for q, qa in enumerate(paragraph["qas"]):
                where_q = f"{where_p}.qas[{q}]"
                if not isinstance(qa, dict):
                    problem(where_q, f"expected an object, got {type(qa).__name__}")
                    continue
                if "question" not in qa:
                    problem(where_q, 'missing "question"')
                    continue
                impossible = bool(qa.get("is_impossible", False))
                raw_answers = qa.get("answers")
                if raw_answers is None and not impossible and require_answers:
                    problem(where_q, 'missing "answers"')
                    continue
                if impossible or raw_answers is None:
                    texts, starts = _NO_ANSWER
                else:
                    if not isinstance(raw_answers, list):
                        problem(where_q, f'"answers" must be a list, got {type(raw_answers).__name__}')
                        continue
                    bad = next((i for i, ans in enumerate(raw_answers)
                                if not isinstance(ans, dict) or "text" not in ans), None)
                    if bad is not None:
                        problem(f"{where_q}.answers[{bad}]", 'expected an object with "text"')
                        continue
                    # An empty "answers" list means unanswerable, as in v2 files that omit "is_impossible".
                    texts = tuple(_text(ans["text"]) for ans in raw_answers)
                    starts = tuple(_as_start(ans.get("answer_start", -1)) for ans in raw_answers)
                raw_id = qa.get("id")
                examples.append(
                    QAExample(
                        id=f"{a}-{p}-{q}" if _is_missing(raw_id) or raw_id == "" else _id_text(raw_id),
                        context=context,
                        question=_text(qa["question"]),
                        answers=texts,
                        answer_starts=starts,
                        source=f"{path}:{where_q}",
                    )
                )
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise DataError(f"{path}: not valid SQuAD JSON: {'; '.join(problems[:3])}{more}; fix those entries")
    return examples


def _read_pubmedqa(path: Path, obj: Any) -> list[QAExample]:
    """PubMedQA: context = the abstract's CONTEXTS joined, answer = LONG_ANSWER (an abstractive answer)."""
    examples = []
    for key, record in obj.items():
        if not isinstance(record, dict) or "QUESTION" not in record:
            raise DataError(f'{path}: entry {key!r}: expected an object with "QUESTION", "CONTEXTS", "LONG_ANSWER"')
        contexts = record.get("CONTEXTS") or []
        context = " ".join(contexts) if isinstance(contexts, list) else _text(contexts)
        long_answer = record.get("LONG_ANSWER")
        examples.append(
            QAExample(
                id=str(key),
                context=context,
                question=_text(record.get("QUESTION")),
                answers=_MISSING[0] if _is_missing(long_answer) else (_text(long_answer),),
                answer_starts=(-1,),
                source=f"{path}:{key}",
            )
        )
    return examples


def _read_qed(path: Path, parsed: list[tuple[int, Any]]) -> list[QAExample]:
    """QED's own JSON lines (Natural Questions with explanations): paragraph_text, question_text, and
    original_nq_answers, a list of annotators' answers, each a list of character spans."""
    examples = []
    for line_number, record in parsed:
        missing = sorted(k for k in _QED_KEYS if k not in record)
        if missing:
            raise DataError(f"{path}: line {line_number}: a QED record needs {', '.join(sorted(_QED_KEYS))}; "
                            f"missing {', '.join(missing)}")
        answers, starts = [], []
        for spans in record.get("original_nq_answers") or []:
            if not isinstance(spans, list) or not spans or not isinstance(spans[0], dict):
                continue
            # A multi-span annotation becomes its first span: the others are separate parts of the paragraph.
            text, start = _text(spans[0].get("string")), spans[0].get("start", -1)
            if text and text not in answers:
                answers.append(text)
                starts.append(start if isinstance(start, int) and not isinstance(start, bool) else -1)
        examples.append(QAExample(
            id=str(record.get("example_id", line_number)),
            context=_text(record.get("paragraph_text")),
            question=_text(record.get("question_text")),
            answers=tuple(answers) if answers else _MISSING[0],
            answer_starts=tuple(starts) if answers else _MISSING[1],
            source=f"{path}:line {line_number}",
        ))
    return examples


# ---------------------------------------------------------------------------------------------- HF datasets


def _read_hf_dataset(dataset: Any, config: DataConfig, where: str, require_answers: bool = True) -> list[QAExample]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        names = list(dataset.keys())
        if config.hf_split is not None:
            if config.hf_split not in dataset:
                raise DataError(f"{where}: no split {config.hf_split!r}; available splits: {', '.join(names)}; "
                                "pass --hf-split with one of them")
            names = [config.hf_split]
        examples: list[QAExample] = []
        for name in names:
            examples.extend(_read_hf_dataset(dataset[name], config, f"{where}[{name}]", require_answers))
        return examples
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{where}: expected a datasets Dataset or DatasetDict, got {type(dataset).__name__}")
    records = dataset.to_list()
    rows = [(f"row {i}", record) for i, record in enumerate(records, start=1)]
    return _records_to_examples(rows, dataset.column_names, config, where, require_answers)


def _load_hf_disk(path: Path, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable `datasets` save_to_disk folder ({exc})") from None
    return _read_hf_dataset(dataset, config, str(path), require_answers)


def _load_hub(name: str, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=config.hf_split)
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"{name}: not a local file, and the Hugging Face Hub is unreachable to load it as a dataset "
            f"({type(exc).__name__}); pass a local file or a save_to_disk folder instead"
        ) from None
    except (ValueError, datasets.exceptions.DatasetNotFoundError) as exc:  # type: ignore[attr-defined]
        raise DataError(f"{name}: no such local file, and not loadable as a Hub dataset ({exc})") from None
    return _read_hf_dataset(dataset, config, name, require_answers)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".json", ".csv", ".tsv", ".parquet", ".txt") + _JSONL_SUFFIXES


def load_examples(source: str | Path | Any, config: DataConfig | None = None, *,
                  require_answers: bool = True) -> list[QAExample]:
    """Read a data file, folder, Hub dataset name or in-memory `datasets` dataset into examples (no cleaning).

    Args:
        source: a path, a Hub dataset name, or a `datasets.Dataset` / `DatasetDict`.
        config: format and column mapping; None uses the defaults.
        require_answers: False for questions to answer (`predict`): then a file without an answer column (or
            SQuAD entries without "answers") is read, and such questions get no references.
    Returns:
        The examples in file order; nothing is dropped here (see `clean_examples`).
    Raises:
        DataError: the source is missing, malformed, of the wrong shape or lacks a column, naming where and the fix.
    """
    config = config or DataConfig()
    if not isinstance(source, (str, Path)):
        return _read_hf_dataset(source, config, type(source).__name__, require_answers)
    fmt = config.format
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(source)
    if not path.exists():
        text = str(source)
        if fmt == "hf" or (fmt is None and _HUB_NAME.match(text) and not text.lower().endswith(_FILE_SUFFIXES)):
            return _load_hub(text, config, require_answers)
        raise DataError(f"{path}: no such file or directory; check the path")
    detected, parsed = (None, None) if fmt in ("parquet", "hf", "hf_disk") else _detect(path)
    fmt = fmt or detected
    logger.debug("reading %s as %s", path, fmt)
    if fmt in ("hf", "hf_disk"):
        return _load_hf_disk(path, config, require_answers)
    if fmt == "parquet":
        return _read_parquet(path, config, require_answers)
    text = parsed if isinstance(parsed, str) else _decode(path, _read_bytes(path))
    if fmt in ("squad", "json", "pubmedqa"):
        obj = parsed if detected in ("squad", "json", "pubmedqa") else _parse_json(path, text)
        if fmt == "squad":
            return _read_squad(path, obj, require_answers)
        if fmt == "pubmedqa":
            if not isinstance(obj, dict):
                raise DataError(f"{path}: PubMedQA JSON must be an object of id -> record")
            return _read_pubmedqa(path, obj)
        if not (isinstance(obj, list) or (isinstance(obj, dict) and isinstance(obj.get("data"), list))):
            raise DataError(f'{path}: flat JSON must be a list of records or {{"data": [records]}}')
        return _read_json_records(path, obj, config, require_answers)
    if fmt in ("jsonl", "qed"):
        return _read_jsonl(path, text, dataclasses.replace(config, format=fmt) if fmt == "qed" else config,
                           require_answers)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, text, "\t" if fmt == "tsv" else ",", config, require_answers)
    raise DataError(f"{path}: unsupported format {fmt!r}")  # pragma: no cover - FORMATS is checked above


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


def context_key(context: str) -> str:
    """The grouping key of a context: NFC with whitespace collapsed, so trivially different copies group together."""
    return " ".join(unicodedata.normalize("NFC", context).split())


def split_examples(
    examples: Sequence[QAExample], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[QAExample]]:
    """Split examples by context: every question about one context lands in the same split.

    Fractions are of distinct contexts. A split with a positive fraction gets at least one context when
    enough contexts exist to leave one for training. Deterministic for a given seed and input order.

    Returns:
        {"train": [...], "validation": [...], "test": [...]}, each in input order.
    Raises:
        DataError: fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must each be in [0, 1) "
            "and sum to less than 1"
        )
    keys: dict[str, None] = {}
    example_keys = []
    for ex in examples:
        key = context_key(ex.context)
        keys.setdefault(key, None)
        example_keys.append(key)
    order = list(keys)
    random.Random(seed).shuffle(order)
    n = len(order)

    def count(fraction: float, available: int) -> int:
        if fraction <= 0 or available < 2:
            return 0
        return min(max(1, round(fraction * n)), available - 1)

    n_test = count(test_fraction, n)
    n_val = count(val_fraction, n - n_test)
    split_of = {}
    for i, key in enumerate(order):
        split_of[key] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    splits: dict[str, list[QAExample]] = {"train": [], "validation": [], "test": []}
    for ex, key in zip(examples, example_keys):
        splits[split_of[key]].append(ex)
    if n and (val_fraction > 0 and not splits["validation"] or test_fraction > 0 and not splits["test"]):
        logger.warning("only %d distinct context(s): some requested splits are empty", n)
    return splits


def write_jsonl(examples: Iterable[QAExample], path: str | Path) -> None:
    """Write examples as JSON lines ({"id","context","question","answers","answer_starts"}), readable back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for ex in examples:
            row = {"id": ex.id, "context": ex.context, "question": ex.question,
                   "answers": list(ex.answers), "answer_starts": list(ex.answer_starts)}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def sample_data_path(language: str = "en") -> Path:
    """Path of the bundled sample dataset: "en" (SQuAD v1.1 JSON) or "zh" (Chinese).

    Raises:
        DataError: an unknown language, or the package data is missing (a broken install).
    """
    names = {"en": "ml_qa.json", "zh": "zh_qa.json"}
    if language not in names:
        raise DataError(f"no sample data for language {language!r}; choose one of {', '.join(names)}")
    path = Path(__file__).resolve().parent / "sample_data" / names[language]
    if not path.is_file():
        raise DataError(f"{path}: bundled sample data is missing; reinstall t5qa")
    return path
