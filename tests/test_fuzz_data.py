"""Bad input, on purpose: fuzz the data loaders with Hypothesis.

The property, for every format (json, jsonl, csv, tsv, squad) and every input: `load_dataset` either returns
examples whose context and question are non-empty strings and whose answers are non-empty strings with
consistent offsets, with a cleaning report that accounts for every example (in = out + dropped, nothing lost
silently), or it raises a `DataError` whose message is one line and names the file. Never another exception
type, never a hang.

CI runs 60 examples per property; for a longer run:
    T5QA_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz_data.py
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
import unicodedata
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from t5qa.config import DataConfig
from t5qa.data import QAExample, clean_examples, load_dataset, load_examples, write_jsonl
from t5qa.errors import DataError, T5QAError

FUZZ_EXAMPLES = int(os.environ.get("T5QA_FUZZ_EXAMPLES", "60"))
# A generous per-example deadline: the machine is shared, but a loader that hangs or goes quadratic on a small
# input still trips it.
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)
PER_TEST_TIMEOUT_S = max(120, FUZZ_EXAMPLES * 3)

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", "")

# Characters that have broken text pipelines before: combining marks, right-to-left text and overrides,
# zero-width joiners, emoji (astral plane), a byte-order mark, NUL and other control characters, and
# Unicode line/paragraph separators that str.splitlines() (but not JSON or CSV) treats as line breaks.
ODD_CHARS = [
    "\u0301", "\u0308", "\u20dd",              # combining acute, diaeresis, enclosing circle
    "\u05d0", "\u0627", "\u202e", "\u200f",    # Hebrew alef, Arabic alef, RTL override, RTL mark
    "\u200d", "\u200b", "\ufeff",              # zero-width joiner / space, BOM
    "\U0001F600", "\U0001F469\u200d\U0001F52C",  # emoji, ZWJ sequence
    "\x00", "\x07", "\x1b", "\x7f",            # NUL, bell, escape, delete
    "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c",  # line breaks only to splitlines()
    "\u00a0", "\u3000",                        # no-break and ideographic space
    "\u00e9", "e\u0301", "\u4e2d\u6587",       # precomposed vs decomposed é, Chinese
    " ", "\t", "\n", "\r", ",", '"', "'", "[", "]", "{", "}", "\\",
]

odd_text = st.lists(
    st.one_of(st.sampled_from(ODD_CHARS), st.text(min_size=1, max_size=4)), max_size=12
).map("".join)
# Text that is sometimes a plausible answer/context word, so some examples survive cleaning.
plain_word = st.sampled_from(["the", "code", "is", "kilo", "paris", "a", "b", "ANSWERNOTFOUND", ""])
text_value = st.one_of(plain_word, odd_text, st.lists(plain_word, max_size=6).map(" ".join))

# Wrong types where strings are expected: numbers (incl. huge and non-finite), booleans, nulls, nested lists
# and objects.
scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=False), text_value,
)
json_value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["text", "answer_start", "x"]), inner, max_size=3)
), max_leaves=8)

FIELD_NAMES = ["context", "question", "answer", "answers", "id", "answer_start", "answer_starts", "extra"]
# Column names: the expected ones, or odd text on one line (names with line breaks: see
# test_column_names_with_line_breaks_keep_the_error_on_one_line).
odd_key = odd_text.filter(lambda key: len(f"a{key}b".splitlines()) == 1)
record = st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), odd_key), st.one_of(text_value, json_value),
                         max_size=7)
# A record that has the three required fields more often than chance would give.
likely_record = st.fixed_dictionaries(
    {"context": st.one_of(text_value, json_value), "question": st.one_of(text_value, json_value),
     "answer": st.one_of(text_value, json_value)},
    optional={"id": json_value, "answer_start": json_value, "answers": json_value},
)
records = st.lists(st.one_of(likely_record, record), max_size=6)


# ------------------------------------------------------------------------------------------------- checks


def _check_error(exc: BaseException, path: Path) -> None:
    """A refusal must be a DataError, one line, naming the file."""
    assert isinstance(exc, DataError), f"{type(exc).__name__} instead of DataError: {exc!r}"
    message = str(exc)
    assert message, "empty error message"
    assert "\n" not in message, f"multi-line error message: {message!r}"
    assert path.name in message, f"the message does not name the file {path.name}: {message!r}"


def _check_loaded(kept: list[QAExample], report: Any, total_in: int) -> None:
    """What loads must be usable, and the report must account for every input example."""
    assert report.total_in == total_in
    assert report.total_out == len(kept)
    assert report.total_in == report.total_out + sum(report.dropped.values()), report.to_dict()
    assert all(count > 0 for count in report.dropped.values())
    ids = [ex.id for ex in kept]
    assert len(ids) == len(set(ids)), "cleaning left duplicate ids"
    for ex in kept:
        assert isinstance(ex.id, str) and ex.id
        assert isinstance(ex.context, str) and ex.context.strip(), ex
        assert isinstance(ex.question, str) and ex.question.strip(), ex
        assert isinstance(ex.answers, tuple) and isinstance(ex.answer_starts, tuple)
        assert len(ex.answers) == len(ex.answer_starts), ex
        for answer, start in zip(ex.answers, ex.answer_starts):
            assert isinstance(answer, str) and answer.strip(), ex
            assert isinstance(start, int) and not isinstance(start, bool)
            assert start == -1 or ex.context[start:start + len(answer)] == answer, (answer, start, ex.context)


def check_file(path: Path, config: DataConfig | None = None) -> list[QAExample] | None:
    """Load `path` the two public ways; returns the kept examples, or None when refused (correctly)."""
    config = config or DataConfig()
    try:
        loaded = load_examples(path, config)
    except T5QAError as exc:
        _check_error(exc, path)
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test: nothing else may escape
        pytest.fail(f"load_examples raised {type(exc).__name__}: {exc!s:.300} on {path.read_bytes()[:300]!r}")
    kept, report = clean_examples(loaded, config)
    _check_loaded(kept, report, len(loaded))
    try:
        again, report_again = load_dataset(path, config)
    except T5QAError as exc:
        _check_error(exc, path)
        assert not kept, "load_dataset refused a file whose examples clean_examples keeps"
        return None
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"load_dataset raised {type(exc).__name__}: {exc!s:.300}")
    assert again == kept and report_again.to_dict() == report.to_dict()
    return kept


def _write(directory: Path, name: str, data: bytes | str) -> Path:
    path = directory / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", newline="")
    else:
        path.write_bytes(data)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _delimited(rows: list[dict[str, Any]], delimiter: str) -> str:
    header = list(dict.fromkeys(k for row in rows for k in row)) or ["context"]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(row.get(k)) for k in header])
    return out.getvalue()


def serialise(rows: list[dict[str, Any]], fmt: str) -> tuple[str, str]:
    """(file name, text) of records in a format; squad nests them as one article."""
    if fmt == "json":
        return "data.json", json.dumps(rows, ensure_ascii=False)
    if fmt == "json_data":
        return "wrapped.json", json.dumps({"data": rows}, ensure_ascii=False)
    if fmt == "jsonl":
        return "data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if fmt == "csv":
        return "data.csv", _delimited(rows, ",")
    if fmt == "tsv":
        return "data.tsv", _delimited(rows, "\t")
    if fmt == "squad":
        paragraphs = [{"context": r.get("context", ""), "qas": [
            {k: v for k, v in (("id", r.get("id")), ("question", r.get("question")),
                               ("answers", r.get("answers", [{"text": r.get("answer"),
                                                              "answer_start": r.get("answer_start", 0)}])))
             if k in r or k == "answers"}]} for r in rows]
        return "squad.json", json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]},
                                        ensure_ascii=False)
    raise AssertionError(fmt)


FORMATS = ("json", "json_data", "jsonl", "csv", "tsv", "squad")


# ------------------------------------------------------------------------------------------------ properties


@pytest.mark.timeout(PER_TEST_TIMEOUT_S)
@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES),
       prefix=st.sampled_from([b"", b"{", b"[", b"context,question,answer\n", b"context\tquestion\tanswer\n",
                               b'{"data": [', b"\xef\xbb\xbf", b"\xff\xfe"]))
def test_random_bytes_load_or_refuse(data: bytes, suffix: str, prefix: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_file(_write(Path(tmp), f"fuzz{suffix}", prefix + data))


@pytest.mark.timeout(PER_TEST_TIMEOUT_S)
@FUZZ
@given(rows=records, fmt=st.sampled_from(FORMATS))
def test_wrong_types_and_odd_unicode_load_or_refuse(rows: list[dict[str, Any]], fmt: str) -> None:
    name, text = serialise(rows, fmt)
    with tempfile.TemporaryDirectory() as tmp:
        check_file(_write(Path(tmp), name, text))


@pytest.mark.timeout(PER_TEST_TIMEOUT_S)
@FUZZ
@given(rows=st.lists(likely_record, min_size=1, max_size=5), fmt=st.sampled_from(FORMATS),
       cut=st.floats(min_value=0.0, max_value=1.0), edit=st.sampled_from(["truncate", "delete", "insert"]),
       junk=st.sampled_from(['"', ",", "\t", "\n", "{", "]", "\\", "\x00", "\u2028", ":"]))
def test_broken_files_load_or_refuse(rows: list[dict[str, Any]], fmt: str, cut: float, edit: str,
                                     junk: str) -> None:
    """A valid file with one cut, deleted or inserted character (broken JSON, unbalanced CSV quotes, ...)."""
    name, text = serialise(rows, fmt)
    at = int(cut * len(text))
    if edit == "truncate":
        text = text[:at]
    elif edit == "delete":
        text = text[:at] + text[at + 1:]
    else:
        text = text[:at] + junk + text[at:]
    with tempfile.TemporaryDirectory() as tmp:
        check_file(_write(Path(tmp), name, text))


@pytest.mark.timeout(PER_TEST_TIMEOUT_S)
@FUZZ
@given(context=st.lists(st.one_of(st.sampled_from(ODD_CHARS), plain_word), min_size=1, max_size=20).map(" ".join),
       question=odd_text, pick=st.data())
def test_odd_unicode_answers_keep_valid_offsets(context: str, question: str, pick: st.DataObject) -> None:
    """Answers cut from a context full of odd characters keep offsets that point at them after cleaning."""
    assume(context.strip() and question.strip())
    start = pick.draw(st.integers(min_value=0, max_value=len(context) - 1))
    end = pick.draw(st.integers(min_value=start + 1, max_value=len(context)))
    answer = context[start:end]
    assume(answer.strip() and answer.strip() not in DataConfig().no_answer_values)
    rows = [{"id": "q1", "context": context, "question": question, "answers": [answer], "answer_starts": [start]}]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "odd.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        kept = check_file(path)
        _, report = load_dataset(path)
    # One valid example with a non-empty question and answer: it must survive, with its answer.
    assert kept is not None and len(kept) == 1 and len(kept[0].answers) == 1
    norm_answer, norm_context = (" ".join(unicodedata.normalize("NFC", t).split()) for t in (answer, context))
    if norm_answer in norm_context:
        # Present after the same normalisation: it must be found (check_file verified the offset points at it).
        assert kept[0].answer_starts[0] != -1, (answer, context, kept[0])
    else:
        # E.g. a lone combining mark that NFC merged into its base letter: flagged, never silently kept.
        assert kept[0].answer_starts[0] == -1 and report.flagged.get("answer_not_in_context") == 1


# ------------------------------------------------------------------------------------- explicit bad inputs


MEGABYTE = 1_000_000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv", "squad"])
@pytest.mark.parametrize("field", ["context", "question", "answer"])
def test_one_megabyte_fields_load_in_reasonable_time(tmp_path: Path, fmt: str, field: str) -> None:
    big = ("lorem ipsum " * (MEGABYTE // 12 + 1))[:MEGABYTE].strip()
    row = {"id": "big", "context": "the code is kilo . " + ("" if field != "context" else big),
           "question": "what is the code?" + (" " + big if field == "question" else ""),
           "answer": "kilo" if field != "answer" else big}
    if field == "answer":
        row["context"] = f"the code is {big} ."
    name, text = serialise([row, {"id": "small", "context": "a b", "question": "q", "answer": "a"}], fmt)
    path = _write(tmp_path, name, text)
    started = time.perf_counter()
    kept = check_file(path)
    elapsed = time.perf_counter() - started
    assert kept is not None and len(kept) == 2
    big_one = next(ex for ex in kept if ex.id == "big")
    value = {"context": big_one.context, "question": big_one.question, "answer": big_one.answers[0]}[field]
    assert len(value) >= len(big)
    if field == "answer":
        assert big_one.answer_starts[0] == big_one.context.index(big)
    assert elapsed < 60, f"{elapsed:.1f}s to load a 1 MB field"


@pytest.mark.parametrize("name,text", [
    ("empty.json", ""),
    ("empty.jsonl", "\n\n"),
    ("empty.csv", ""),
    ("header_only.csv", "context,question,answer\n"),
    ("nul.json", "\x00\x00\x00"),
    ("null.json", "null"),
    ("number.json", "42"),
    ("string.json", '"context"'),
    ("list_of_lists.json", "[[1, 2], [3]]"),
    ("squad_wrong.json", '{"data": [{"paragraphs": [{"context": "c", "qas": "not a list"}]}]}'),
    ("squad_answers_str.json", '{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", '
                               '"answers": "c"}]}]}]}'),
    ("jsonl_array_line.jsonl", '{"context": "a", "question": "q", "answer": "a"}\n[1, 2]\n'),
    ("unbalanced.csv", 'context,question,answer\n"abc,q,a\n'),
    ("too_many_cells.tsv", "context\tquestion\tanswer\na\tb\tc\td\n"),
    ("no_columns.csv", "foo,bar\n1,2\n"),
])
def test_malformed_files_are_refused_with_the_file_named(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    _check_error(info.value, path)


def test_utf16_and_latin1_files_are_refused_with_a_hint(tmp_path: Path) -> None:
    utf16 = _write(tmp_path, "utf16.csv", "context,question,answer\na,b,a\n".encode("utf-16"))
    latin1 = _write(tmp_path, "latin1.csv", "context,question,answer\ncaf\u00e9,q,caf\u00e9\n".encode("latin-1"))
    for path, hint in ((utf16, "UTF-16"), (latin1, "UTF-8")):
        with pytest.raises(DataError, match=hint) as info:
            load_dataset(path)
        _check_error(info.value, path)


def test_lone_surrogate_bytes_are_refused(tmp_path: Path) -> None:
    # A UTF-16 surrogate encoded as if it were a character (CESU-8): not valid UTF-8.
    path = _write(tmp_path, "surrogate.jsonl",
                  b'{"context": "a \xed\xa0\x80 b", "question": "q", "answer": "a"}\n{"context": "a"}\n')
    with pytest.raises(DataError) as info:
        load_dataset(path)
    _check_error(info.value, path)


def test_every_drop_is_counted_with_a_reason(tmp_path: Path) -> None:
    rows = [
        {"id": "ok", "context": "the code is kilo", "question": "what is the code?", "answer": "kilo"},
        {"id": "no-context", "context": "   ", "question": "q", "answer": "a"},
        {"id": "no-question", "context": "the code is kilo", "question": None, "answer": "kilo"},
        {"id": "no-answer", "context": "the code is kilo", "question": "q2", "answer": "  "},
        {"id": "dup", "context": "the code is kilo", "question": "what is the code?", "answer": "kilo"},
    ]
    kept = check_file(_write(tmp_path, "drops.jsonl", serialise(rows, "jsonl")[1]))
    assert kept is not None and [ex.id for ex in kept] == ["ok"]
    _, report = load_dataset(tmp_path / "drops.jsonl")
    assert report.dropped == {"empty_context": 1, "empty_question": 1, "empty_answer": 1, "duplicate": 1}


# ----------------------------------------------------------------------------- found bugs (regression tests)


@pytest.mark.parametrize("name,text", [
    # Deeply nested JSON: json.loads raises RecursionError, not JSONDecodeError.
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    # The same inside an answer cell that looks like a JSON list.
    ("deep_answer.jsonl", '{"context": "a b", "question": "q", "answer": "' + "[" * 5000 + "]" * 5000 + '"}\n'
                          '{"context": "a", "question": "q", "answer": "a"}\n'),
    ("deep_start.csv", 'context,question,answer,answer_start\nab,q,a,"' + "[" * 5000 + "]" * 5000 + '"\n'),
    # A non-finite offset (JSON's 1e999 parses to inf): int(inf) raises OverflowError.
    ("inf_start.jsonl", '{"context": "a b", "question": "q", "answers": ["a"], "answer_starts": [1e999]}\n'
                        '{"context": "a", "question": "q", "answer": "a"}\n'),
    # An integer of more than 4300 digits: json.loads raises a plain ValueError (int max str digits).
    ("huge_int.json", '[{"context": "a b", "question": "q", "answer": "a", "id": ' + "9" * 5000 + "}]"),
])
def test_pathological_json_is_loaded_or_refused_cleanly(tmp_path: Path, name: str, text: str) -> None:
    check_file(_write(tmp_path, name, text))


def test_jsonl_with_unicode_line_separator_inside_a_string_loads(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False), which write_jsonl uses, writes U+2028 raw; it is valid inside a JSON string,
    # but str.splitlines() breaks the line there.
    rows = [{"id": "1", "context": "the code\u2028is kilo", "question": "what is the code?", "answers": ["kilo"],
             "answer_starts": [12]},
            {"id": "2", "context": "the city is oslo", "question": "what is the city?", "answers": ["oslo"],
             "answer_starts": [12]}]
    kept = check_file(_write(tmp_path, "sep.jsonl", serialise(rows, "jsonl")[1]))
    assert kept is not None and len(kept) == 2


@pytest.mark.parametrize("name,text", [
    ("header.csv", '"con\ntext",question,answer\nx,y,z\n'),
    ("keys.json", json.dumps([{"con\ntext": "a", "question": "q", "answer": "a", "\u2028": 1}])),
])
def test_column_names_with_line_breaks_keep_the_error_on_one_line(tmp_path: Path, name: str, text: str) -> None:
    # The "available columns: ..." list quotes column names raw, so a name with a line break splits the message.
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    _check_error(info.value, path)


def test_loaded_examples_can_be_written_back(tmp_path: Path) -> None:
    # A JSON escape of a lone surrogate is valid JSON; the loaded text then cannot be encoded as UTF-8, so
    # write_jsonl (used by `t5qa data prepare`) must not crash on it: refuse it at load time, or write it.
    path = _write(tmp_path, "surrogate.json",
                  '[{"id": "1", "context": "a \\ud800 b", "question": "q", "answer": "a"}]')
    try:
        kept, _ = load_dataset(path)
    except DataError as exc:
        _check_error(exc, path)
        return
    write_jsonl(kept, tmp_path / "out.jsonl")
    assert load_examples(tmp_path / "out.jsonl")[0].answers == ("a",)


# ---------------------------------------------------------------------------------------------------- the CLI


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from t5qa.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,data", [
    ("random.json", bytes(range(256)) * 3),
    ("broken.json", b'[{"context": "a", "question": "q", "answer": '),
    ("broken.csv", b'context,question,answer\n"a,b\n'),
    ("types.jsonl", b'{"context": 1, "question": [1, {"a": null}], "answer": true}\n{"context": null}\n'),
    ("empty.tsv", b""),
    ("odd.jsonl", json.dumps({"context": "\u202e\u05d0 e\u0301 \U0001F600", "question": "\u0627?",
                              "answer": "\U0001F600"}, ensure_ascii=False).encode() + b"\n" + b'{"context": "x"}\n'),
    ("ok.csv", b"context,question,answer\nthe code is kilo,what is the code?,kilo\n"),
])
def test_cli_inspect_on_fuzzed_files_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   name: str, data: bytes) -> None:
    path = _write(tmp_path, name, data)
    code, out, err = _run_cli(["data", "inspect", str(path)], capsys)
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: ") and path.name in lines[-1], err
        assert len([line for line in lines if line.startswith("error: ")]) == 1
        assert not out.strip()
    else:
        assert path.name in out


@pytest.mark.timeout(PER_TEST_TIMEOUT_S)
@settings(max_examples=max(10, FUZZ_EXAMPLES // 4), deadline=timedelta(seconds=20), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=records, fmt=st.sampled_from(FORMATS))
def test_cli_prepare_on_fuzzed_records_exits_cleanly(capsys: pytest.CaptureFixture[str],
                                                     rows: list[dict[str, Any]], fmt: str) -> None:
    name, text = serialise(rows, fmt)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), name, text)
        out_dir = Path(tmp) / "prepared"
        code, out, err = _run_cli(["data", "prepare", str(path), "--output", str(out_dir), "--json"], capsys)
        assert code in (0, 2), (code, err)
        assert "Traceback" not in err
        if code == 0:
            report = json.loads(out)
            written = sum(len(load_examples(out_dir / f"{split}.jsonl")) for split in ("train", "validation", "test")
                          if (out_dir / f"{split}.jsonl").stat().st_size)
            assert written == report["kept"]["questions"] == report["cleaning"]["total_out"]
        else:
            assert err.strip().startswith("error: ") and "\n" not in err.strip()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text", [
    "\\ud800 lone surrogate escape",  # valid JSON, not encodable as UTF-8
    "nul \\u0000 and \\u2028 separators \\u0085",
    "\\u202e\\u05d0 e\\u0301 \\ud83d\\ude00",  # RTL override, Hebrew, combining mark, an escaped emoji pair
])
def test_predict_cli_on_odd_unicode_data_exits_cleanly(tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], text: str) -> None:
    """`t5qa predict --data` reads files without cleaning them: odd text must be answered or refused in one line."""
    path = _write(tmp_path, "odd.json", '[{"id": "1", "context": "the code is kilo ' + text + '", '
                                        '"question": "what is the code? ' + text + '", "answer": "kilo"}]')
    out = tmp_path / "answers.jsonl"
    code, _, err = _run_cli(["predict", "--model", str(tiny_model_dir), "--data", str(path), "--output", str(out),
                             "--no-progress"], capsys)
    assert "Traceback" not in err
    assert code in (0, 2), err[-2000:]
    if code == 0:
        # split("\n"), not splitlines(): a JSON line may hold a raw U+2028 inside a string.
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line.strip()]
        assert [row["id"] for row in rows] == ["1"] and isinstance(rows[0]["prediction"], str)
    else:
        assert err.strip().startswith("error: ") and path.name in err and "\n" not in err.strip()
