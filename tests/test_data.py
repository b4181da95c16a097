"""data.py: every input format, every cleaning rule, the grouped split, and every bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from t5qa.config import DataConfig
from t5qa.data import (
    QAExample,
    clean_examples,
    context_key,
    detect_format,
    load_dataset,
    load_examples,
    split_examples,
    write_jsonl,
)
from t5qa.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def ex(context: str, question: str = "q?", answers: tuple[str, ...] = ("a",), starts: tuple[int, ...] | None = None,
       id: str = "x") -> QAExample:
    return QAExample(id=id, context=context, question=question, answers=answers,
                     answer_starts=starts if starts is not None else tuple(-1 for _ in answers), source=f"test:{id}")


def answer_at(example: QAExample, i: int = 0) -> str:
    start = example.answer_starts[i]
    return example.context[start:start + len(example.answers[i])]


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("name, fmt", [
    ("squad_v1.json", "squad"), ("squad_v2.json", "squad"), ("flat.json", "json"), ("flat.jsonl", "jsonl"),
    ("flat.csv", "csv"), ("flat.tsv", "tsv"), ("pubmedqa.json", "pubmedqa"),
])
def test_detect_format_from_content(name: str, fmt: str, tmp_path: Path) -> None:
    assert detect_format(FIXTURES / name) == fmt
    # Content, not the file name, decides: the same bytes under a neutral name give the same format.
    renamed = tmp_path / "data.txt"
    renamed.write_bytes((FIXTURES / name).read_bytes())
    assert detect_format(renamed) == fmt


def test_single_record_jsonl_named_json_is_read(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text('{"context": "Ice is cold.", "question": "How is ice?", "answer": "cold"}\n')
    assert detect_format(path) == "jsonl"
    assert load_examples(path)[0].answers == ("cold",)


def test_squad_v1_keeps_every_reference_answer() -> None:
    examples = load_examples(FIXTURES / "squad_v1.json")
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    assert examples[0].answers == ("The Nile", "Nile")
    assert examples[0].answer_starts == (0, 4)
    assert examples[1].source.endswith("squad_v1.json:data[0].paragraphs[0].qas[1]")
    assert all(answer_at(e, i) == a for e in examples for i, a in enumerate(e.answers))


def test_squad_v2_impossible_questions_are_kept_and_flagged() -> None:
    examples, report = load_dataset(FIXTURES / "squad_v2.json")
    by_id = {e.id: e for e in examples}
    assert by_id["m1"].is_answerable and by_id["m1"].answers == ("two",)
    assert not by_id["m2"].is_answerable and by_id["m2"].answers == ()
    assert report.flagged == {"unanswerable": 1}
    assert report.examples["unanswerable"] == [by_id["m2"].source]


def test_squad_v2_unanswerable_dropped_on_request() -> None:
    examples, report = load_dataset(FIXTURES / "squad_v2.json", DataConfig(drop_unanswerable=True))
    assert [e.id for e in examples] == ["m1"]
    assert report.dropped == {"unanswerable": 1}


def test_flat_json_list_and_data_wrapper(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "flat.json").read_text())
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": records}))
    for path in (FIXTURES / "flat.json", wrapped):
        examples = load_examples(path)
        assert [e.answers for e in examples] == [("Jupiter",), ("Mercury",)]
        assert [e.id for e in examples] == ["1", "2"]  # no id column: rows are numbered


def test_jsonl_with_squad_style_answer_dict() -> None:
    examples, report = load_dataset(FIXTURES / "flat.jsonl")
    assert examples[0].answers == ("100 degrees Celsius", "100 degrees")
    assert examples[0].answer_starts == (15, 15)
    assert examples[1].answers == () and report.flagged["unanswerable"] == 1  # {"text": []} means unanswerable
    assert examples[0].source.endswith("flat.jsonl:line 1")


def test_csv_list_answers_and_no_answer_marker() -> None:
    examples, report = load_dataset(FIXTURES / "flat.csv")
    by_id = {e.id: e for e in examples}
    assert by_id["c1"].answers == ("Paris",)
    assert by_id["c2"].answers == ("Paris", "Lyon")  # "['Paris', 'Lyon']" is two references, not one string
    assert [answer_at(by_id["c2"], i) for i in range(2)] == ["Paris", "Lyon"]
    assert by_id["c3"].answers == ()  # ANSWERNOTFOUND
    assert by_id["c1"].source.endswith("flat.csv:row 1 (line 2)")
    assert report.normalised["answer_start_located"] == 2


def test_csv_bracketed_text_that_is_not_a_list_stays_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('context,question,answer\n"see [1] and [2]",which?,[1]\n"x [broken",q?,[broken\n')
    examples = load_examples(path)
    assert [e.answers for e in examples] == [("[1]",), ("[broken",)]


def test_tsv() -> None:
    examples = load_examples(FIXTURES / "flat.tsv")
    assert [(e.id, e.answers) for e in examples] == [("t1", ("Berlin",)), ("t2", ("Rome",))]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "passage": ["Ada Lovelace wrote the first program.", "Grace Hopper built a compiler."],
        "query": ["Who wrote the first program?", "Who built a compiler?"],
        "answers": [["Ada Lovelace", "Lovelace"], ["Grace Hopper"]],
    })
    path = tmp_path / "qa.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "parquet"
    examples = load_examples(path, DataConfig(context_column="passage", question_column="query"))
    assert [e.answers for e in examples] == [("Ada Lovelace", "Lovelace"), ("Grace Hopper",)]
    assert examples[1].question == "Who built a compiler?"


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    def make(n: int, prefix: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "id": [f"{prefix}{i}" for i in range(n)],
            "context": [f"Item {prefix}{i} costs {i} euros." for i in range(n)],
            "question": [f"What does item {prefix}{i} cost?" for i in range(n)],
            "answers": [{"text": [f"{i} euros"], "answer_start": [len(f"Item {prefix}{i} costs ")]} for i in range(n)],
        })

    make(3, "a").save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": make(3, "t"), "validation": make(2, "v")}).save_to_disk(str(tmp_path / "dict"))
    assert detect_format(tmp_path / "single") == "hf_disk"
    single = load_examples(tmp_path / "single")
    assert [e.answers for e in single] == [("0 euros",), ("1 euros",), ("2 euros",)]
    assert all(answer_at(e) == e.answers[0] for e in single)
    assert [e.id for e in load_examples(tmp_path / "dict")] == ["t0", "t1", "t2", "v0", "v1"]
    assert [e.id for e in load_examples(tmp_path / "dict", DataConfig(hf_split="validation"))] == ["v0", "v1"]
    with pytest.raises(DataError, match="no split 'test'.*train, validation.*--hf-split"):
        load_examples(tmp_path / "dict", DataConfig(hf_split="test"))
    # An in-memory dataset works too.
    assert len(load_examples(make(4, "m"))) == 4


def test_pubmedqa_format() -> None:
    examples = load_examples(FIXTURES / "pubmedqa.json")
    assert examples[0].id == "111"
    assert examples[0].context == "Caffeine blocks adenosine receptors. Subjects reported higher alertness."
    assert examples[0].answers == ("Coffee improves alertness through caffeine.",)


def test_column_flags_map_other_names(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("key,review,ask,span\nr9,The soup was cold.,How was the soup?,cold\n"
                    "r10,Great staff.,How was the staff?,ANSWERNOTFOUND\n")
    config = DataConfig(context_column="review", question_column="ask", answer_column="span", id_column="key")
    examples = load_examples(path, config)
    assert [(e.id, e.answers) for e in examples] == [("r9", ("cold",)), ("r10", ())]


def test_write_jsonl_reads_back_identically(tmp_path: Path) -> None:
    examples, _ = load_dataset(FIXTURES / "squad_v1.json")
    examples.append(ex("Nothing here.", "Unanswerable?", answers=(), id="u1"))
    path = tmp_path / "out.jsonl"
    write_jsonl(examples, path)
    back = load_examples(path)
    strip = [(e.id, e.context, e.question, e.answers, e.answer_starts) for e in examples]
    assert [(e.id, e.context, e.question, e.answers, e.answer_starts) for e in back] == strip


def test_hub_name_offline_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/qa' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"someone/qa: not a local file, and the Hugging Face Hub is unreachable.*"
                                        r"pass a local file"):
        load_examples("someone/qa")


def test_missing_file_with_a_file_suffix_is_not_looked_up_on_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not reach the Hub"))
    with pytest.raises(DataError, match="missing.json: no such file or directory"):
        load_examples("data/missing.json")


# ---------------------------------------------------------------------------------------------- cleaning


def test_whitespace_and_nfc_normalisation_keep_offsets_right() -> None:
    decomposed = "Cafe\u0301"  # "Café" with a combining accent; NFC composes it into one character
    context = f"  The   {decomposed} \n\n opens\tat  nine  o'clock.  "
    start = context.index("nine")
    cleaned, report = clean_examples([ex(context, " When  does it\u00a0open? ", ("nine  o'clock",), (start,))])
    (only,) = cleaned
    assert only.context == "The Caf\u00e9 opens at nine o'clock."
    assert only.question == "When does it open?"
    assert only.answers == ("nine o'clock",)
    assert answer_at(only) == "nine o'clock"
    assert report.normalised["whitespace"] == 1 and report.normalised["unicode_nfc"] == 1
    assert "answer_start_repaired" not in report.normalised  # a mapped offset is not a repair


@pytest.mark.parametrize("field, reason", [("context", "empty_context"), ("question", "empty_question"),
                                           ("answers", "empty_answer")])
def test_empty_fields_are_dropped_and_counted(field: str, reason: str) -> None:
    good = ex("Tokyo is big.", "What is big?", ("Tokyo",), id="good")
    values = {"context": "Tokyo is big.", "question": "What is big?", "answers": ("Tokyo",)}
    values[field] = ("  ",) if field == "answers" else " \n "
    bad = ex(values["context"], values["question"], values["answers"], id="bad")
    cleaned, report = clean_examples([good, bad])
    assert [e.id for e in cleaned] == ["good"]
    assert report.dropped == {reason: 1}
    assert report.examples[reason] == ["test:bad"]
    assert (report.total_in, report.total_out) == (2, 1)


def test_an_empty_answer_among_good_ones_is_removed_and_counted() -> None:
    cleaned, report = clean_examples([ex("Red and blue.", "Colours?", ("Red", ""), (0, -1))])
    assert cleaned[0].answers == ("Red",)
    assert report.normalised["empty_answer_removed"] == 1


def test_exact_duplicates_are_dropped_after_normalisation() -> None:
    a = ex("Lima is in Peru.", "Where is Lima?", ("Peru",), id="a")
    b = ex("Lima  is in Peru. ", "Where is Lima?", ("Peru",), id="b")  # same after whitespace normalisation
    c = ex("Lima is in Peru.", "Where is Lima?", ("in Peru",), id="c")  # another answer: not a duplicate
    cleaned, report = clean_examples([a, b, c])
    assert [e.id for e in cleaned] == ["a", "c"]
    assert report.dropped == {"duplicate": 1}


def test_offset_off_by_a_few_characters_is_repaired_to_the_nearest_occurrence() -> None:
    context = "cat one. cat two. cat three."
    true_start = context.index("cat", 10)  # the second "cat"
    cleaned, report = clean_examples([ex(context, "which?", ("cat",), (true_start + 2,))])
    assert cleaned[0].answer_starts == (true_start,)
    assert report.normalised == {"answer_start_repaired": 1}


def test_answer_not_in_context_is_flagged_by_default_and_dropped_on_request() -> None:
    examples = [ex("Milk is white.", "Colour of milk?", ("white",), id="ok"),
                ex("Milk is white.", "Colour of grass?", ("green",), id="missing")]
    kept, report = clean_examples(examples)
    assert [e.id for e in kept] == ["ok", "missing"]
    assert kept[1].answer_starts == (-1,)
    assert report.flagged == {"answer_not_in_context": 1}
    kept, report = clean_examples(examples, DataConfig(drop_answers_not_in_context=True))
    assert [e.id for e in kept] == ["ok"]
    assert report.dropped == {"answer_not_in_context": 1}


def test_answer_spaced_like_tokenised_text_takes_the_context_span() -> None:
    context = "Overall I'll give it $11 and a strong 2/5."
    cleaned, report = clean_examples([ex(context, "Price?", ("$ 11",)), ex(context, "Verdict?", ("I 'll",))])
    assert [e.answers for e in cleaned] == [("$11",), ("I'll",)]
    assert all(answer_at(e) == e.answers[0] for e in cleaned)
    assert report.normalised["answer_text_repaired"] == 2
    assert "answer_not_in_context" not in report.flagged


def test_repeated_ids_are_renamed_so_predictions_stay_distinct() -> None:
    cleaned, report = clean_examples([ex("A b.", "q1?", ("b",), id="7"), ex("C d.", "q2?", ("d",), id="7"),
                                      ex("E f.", "q3?", ("f",), id="7-2")])
    assert [e.id for e in cleaned] == ["7", "7-2", "7-2-2"]
    assert len({e.id for e in cleaned}) == 3
    assert report.normalised["duplicate_id_renamed"] == 2


def test_answers_longer_than_the_target_limit_are_counted(tiny_tokenizer) -> None:
    short = ex("the code is kilo .", "what is the code?", ("kilo",), id="short")
    long_answer = "alpha bravo charlie echo foxtrot golf hotel india"
    long = ex(f"the code is {long_answer} .", "what is the code?", (long_answer,), id="long")
    limit = len(tiny_tokenizer(long_answer)["input_ids"]) - 1
    assert len(tiny_tokenizer("kilo")["input_ids"]) <= limit
    kept, report = clean_examples([short, long], tokenizer=tiny_tokenizer, max_answer_tokens=limit)
    assert len(kept) == 2  # flagged, not dropped: labels are truncated
    assert report.flagged == {"answer_too_long": 1}
    assert report.examples["answer_too_long"] == ["test:long"]


def test_report_keeps_at_most_five_example_sources_and_is_json() -> None:
    examples = [ex("Same.", "Same?", ("Same",), id=str(i)) for i in range(9)]
    _, report = clean_examples(examples)
    assert report.dropped == {"duplicate": 8}
    assert len(report.examples["duplicate"]) == 5
    assert json.loads(json.dumps(report.to_dict()))["dropped"] == {"duplicate": 8}


# --------------------------------------------------------------------------------------------------- split


def _many(n_contexts: int, per_context: int = 3) -> list[QAExample]:
    out = []
    for c in range(n_contexts):
        for q in range(per_context):
            # Every other context comes back with different spacing: it must still group with its twin.
            spacing = "  " if q % 2 else " "
            out.append(ex(f"Context{spacing}number {c} .", f"question {q}?", ("number",), id=f"{c}-{q}"))
    return out


def test_split_never_puts_a_context_in_two_splits() -> None:
    examples = _many(50)
    splits = split_examples(examples, 0.2, 0.1, seed=1)
    keys = {name: {context_key(e.context) for e in part} for name, part in splits.items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(p) for p in splits.values()) == len(examples)
    assert (len(keys["validation"]), len(keys["test"]), len(keys["train"])) == (10, 5, 35)


def test_split_is_seeded_and_deterministic() -> None:
    examples = _many(40)
    first = split_examples(examples, 0.25, 0.25, seed=7)
    again = split_examples(examples, 0.25, 0.25, seed=7)
    other = split_examples(examples, 0.25, 0.25, seed=8)
    ids = lambda s: {k: [e.id for e in v] for k, v in s.items()}  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_split_gives_small_datasets_at_least_one_context_per_requested_split() -> None:
    splits = split_examples(_many(3), 0.05, 0.05, seed=0)
    assert all(len({context_key(e.context) for e in part}) == 1 for part in splits.values())
    only_one = split_examples(_many(1), 0.1, 0.1, seed=0)
    assert len(only_one["train"]) == 3 and not only_one["validation"] and not only_one["test"]


def test_split_rejects_fractions_that_leave_no_training_data() -> None:
    with pytest.raises(DataError, match="--val-fraction"):
        split_examples(_many(5), 0.6, 0.5, seed=0)


# ---------------------------------------------------------------------------------------------- bad input


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


BAD_INPUTS = {
    # name: (file name, content, config, message regex)
    "missing file": (None, None, {}, r"nope\.json: no such file or directory"),
    "malformed json": ("bad.json", '{"data": [\n  {"paragraphs": [}\n]}', {},
                       r"bad\.json: invalid JSON at line 2, column 19"),
    "malformed jsonl": ("bad.jsonl", '{"context": "a", "question": "b", "answer": "a"}\n{"context": oops}\n', {},
                        r"bad\.jsonl: line 2, column 13: invalid JSON"),
    "malformed csv quoting": ("bad.csv", 'context,question,answer\nok,fine?,ok\n"a "b" c",q?,a\n', {},
                              r"bad\.csv: row 2 \(line 3\): malformed CSV"),
    "csv wrong field count": ("bad2.csv", "context,question,answer\nok,fine?,ok\nx,y,z,extra\n", {},
                              r"bad2\.csv: row 2 \(line 3\): 4 fields but the header has 3"),
    "missing column": ("cols.csv", "passage,question,answer\np,q?,a\n", {},
                       r"cols\.csv: no context column .*pass --context-column NAME.*available columns: passage, "
                       r"question, answer"),
    "bad column flag": ("cols2.csv", "context,question,answer\np,q?,a\n", {"answer_column": "span"},
                        r"--answer-column 'span' is not a column; available columns: context, question, answer"),
    "not utf-8": ("latin.csv", "context,question,answer\nCaf\u00e9 au lait,q?,lait\n".encode("latin-1"), {},
                  r"latin\.csv: line 2: not UTF-8 text.*iconv -f LATIN1 -t UTF-8"),
    "empty csv": ("empty.csv", "context,question,answer\n", {}, r"empty\.csv: the dataset is empty"),
    "empty file": ("blank.csv", "", {}, r"blank\.csv: empty CSV file"),
    "empty json list": ("empty.json", "[]", {}, r"empty\.json: the dataset is empty"),
    "squad wrong shape": ("shape.json", json.dumps({"data": [{"paragraphs": [
        {"context": "c", "qas": [{"id": "1", "question": "q", "answers": []}]},
        {"context": "c", "qas": []},
        {"context": "c", "qas": [{"id": "2", "question": "q", "answers": []}, {"id": "3", "answers": []}]},
    ]}]}), {}, r'shape\.json: not valid SQuAD JSON: data\[0\]\.paragraphs\[2\]\.qas\[1\]: missing "question"'),
    "squad answer without text": ("shape2.json", json.dumps({"data": [{"paragraphs": [
        {"context": "c", "qas": [{"id": "1", "question": "q", "answers": [{"answer_start": 0}]}]}]}]}), {},
        r'data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]: expected an object with "text"'),
    "unknown json shape": ("shape3.json", '{\n  "questions": 3\n}', {}, r"shape3\.json: JSON of an unknown shape"),
    "bad format flag": ("ok.csv", "context,question,answer\nc,q,c\n", {"format": "xml"},
                        r"--format must be one of squad, json"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_clear_data_error(case: str, tmp_path: Path) -> None:
    name, content, overrides, pattern = BAD_INPUTS[case]
    path = write(tmp_path, name, content) if name else tmp_path / "nope.json"
    with pytest.raises(DataError) as info:
        load_dataset(path, DataConfig(**overrides))
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_utf8_with_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, "bom.csv", "\ufeffcontext,question,answer\nSnow is cold.,How is snow?,cold\n")
    assert load_examples(path)[0].answers == ("cold",)


def test_every_row_dropped_is_an_error_naming_the_reasons(tmp_path: Path) -> None:
    path = write(tmp_path, "blank.csv", "context,question,answer\n,,\n , , \n")
    with pytest.raises(DataError, match=r"all 2 examples were dropped by cleaning \(empty_context: 2\)"):
        load_dataset(path)


def test_lone_surrogates_from_json_escapes_are_replaced_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "s.json", '[{"id": "1", "context": "a \\ud800 b", "question": "q?", "answer": "b"}]')
    kept, report = load_dataset(path)
    assert kept[0].context == "a \ufffd b" and answer_at(kept[0]) == "b"
    assert report.normalised["lone_surrogate_replaced"] == 1
    write_jsonl(kept, tmp_path / "out.jsonl")  # now encodable as UTF-8
    assert load_examples(tmp_path / "out.jsonl")[0].context == "a \ufffd b"


def test_qed_jsonlines_maps_paragraph_question_and_answer_spans(tmp_path):
    import json

    from t5qa.config import DataConfig
    from t5qa.data import load_dataset

    paragraph = "The first prize was awarded in 1901 to Wilhelm Roentgen of Germany ."
    rows = [
        {"example_id": 7, "question_text": "who won the first prize", "paragraph_text": paragraph,
         "original_nq_answers": [[{"start": 39, "end": 66, "string": "Wilhelm Roentgen of Germany"}],
                                 [{"start": 39, "end": 55, "string": "Wilhelm Roentgen"}]]},
        {"example_id": 8, "question_text": "when was it awarded", "paragraph_text": paragraph,
         "original_nq_answers": [[{"start": 31, "end": 35, "string": "1901"}]]},
    ]
    path = tmp_path / "qed.jsonlines"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    examples, report = load_dataset(path, DataConfig())
    assert [e.id for e in examples] == ["7", "8"]
    assert examples[0].answers == ("Wilhelm Roentgen of Germany", "Wilhelm Roentgen")
    for ex in examples:
        for answer, start in zip(ex.answers, ex.answer_starts):
            assert ex.context[start:start + len(answer)] == answer
    assert report.total_out == 2
