"""One reader per format: detect the format of a source from its content and read it into `QAExample` records.

Supported sources (detected from the content; `DataConfig.format` overrides):
- `squad`: SQuAD v1.1 / v2.0 nested JSON (`data[].paragraphs[].qas[]`); v2 `is_impossible` questions are kept as
  unanswerable;
- `json` (a list of records or `{"data": [...]}`), `jsonl`, `csv`, `tsv`, `parquet`: flat records whose columns
  are mapped with `DataConfig.*_column` (by default `context`, `question`, `answer`/`answers`, `id`);
- `pubmedqa`: PubMedQA's dict of id -> {QUESTION, CONTEXTS, LONG_ANSWER};
- `qed`: QED's own JSON lines (paragraph_text, question_text, original_nq_answers spans);
- `hf`: a `datasets` Dataset/DatasetDict saved with `save_to_disk`, or a Hugging Face Hub dataset name.

Reading changes nothing: cleaning (`t5qa.data.clean`) is a separate step.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from t5qa.config import DataConfig
from t5qa.data.records import (FORMATS, MISSING_ANSWER, NO_ANSWER, QAExample, as_start, id_text, is_missing,
                               records_to_examples, text_of)
from t5qa.errors import DataError

logger = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_MAX_EXAMPLE_SOURCES = 5


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
    return records_to_examples(rows, header, config, str(path), require_answers)


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
    return records_to_examples(rows, _union_keys(records), config, str(path), require_answers)


_QED_KEYS = {"paragraph_text", "question_text", "original_nq_answers"}


def _read_jsonl(path: Path, text: str, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    parsed = _parse_jsonl(path, text)
    if config.format == "qed" or (config.format is None and parsed and _QED_KEYS <= parsed[0][1].keys()
                                  and config.context_column is None):
        return _read_qed(path, parsed)
    rows = [(f"line {n}", record) for n, record in parsed]
    return records_to_examples(rows, _union_keys(r for _, r in parsed), config, str(path), require_answers)


def _read_parquet(path: Path, config: DataConfig, require_answers: bool = True) -> list[QAExample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); re-export it") from None
    records = table.to_pylist()
    rows = [(f"row {i}", record) for i, record in enumerate(records, start=1)]
    return records_to_examples(rows, table.column_names, config, str(path), require_answers)


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
            context = text_of(paragraph["context"])
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
                    texts, starts = NO_ANSWER
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
                    texts = tuple(text_of(ans["text"]) for ans in raw_answers)
                    starts = tuple(as_start(ans.get("answer_start", -1)) for ans in raw_answers)
                raw_id = qa.get("id")
                examples.append(
                    QAExample(
                        id=f"{a}-{p}-{q}" if is_missing(raw_id) or raw_id == "" else id_text(raw_id),
                        context=context,
                        question=text_of(qa["question"]),
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
        context = " ".join(contexts) if isinstance(contexts, list) else text_of(contexts)
        long_answer = record.get("LONG_ANSWER")
        examples.append(
            QAExample(
                id=str(key),
                context=context,
                question=text_of(record.get("QUESTION")),
                answers=MISSING_ANSWER[0] if is_missing(long_answer) else (text_of(long_answer),),
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
            text, start = text_of(spans[0].get("string")), spans[0].get("start", -1)
            if text and text not in answers:
                answers.append(text)
                starts.append(start if isinstance(start, int) and not isinstance(start, bool) else -1)
        examples.append(QAExample(
            id=str(record.get("example_id", line_number)),
            context=text_of(record.get("paragraph_text")),
            question=text_of(record.get("question_text")),
            answers=tuple(answers) if answers else MISSING_ANSWER[0],
            answer_starts=tuple(starts) if answers else MISSING_ANSWER[1],
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
    return records_to_examples(rows, dataset.column_names, config, where, require_answers)


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



def sample_data_path(language: str = "en") -> Path:
    """Path of the bundled sample dataset: "en" (SQuAD v1.1 JSON) or "zh" (Chinese).

    Raises:
        DataError: an unknown language, or the package data is missing (a broken install).
    """
    names = {"en": "ml_qa.json", "zh": "zh_qa.json"}
    if language not in names:
        raise DataError(f"no sample data for language {language!r}; choose one of {', '.join(names)}")
    path = Path(__file__).resolve().parents[1] / "sample_data" / names[language]
    if not path.is_file():
        raise DataError(f"{path}: bundled sample data is missing; reinstall t5qa")
    return path
