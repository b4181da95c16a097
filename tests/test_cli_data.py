"""`t5qa data inspect|prepare` through `t5qa.cli.main`: output, files, exit codes and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from t5qa.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
T5_TOKENIZER = SHARED_DATA / "t5-small-tokenizer"


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    return json.loads(out)


def test_inspect_json_reports_counts_and_cleaning(capsys: pytest.CaptureFixture) -> None:
    result = run_json(capsys, "data", "inspect", str(FIXTURES / "flat.csv"))
    assert result["format"] == "csv"
    assert result["loaded"] == {"questions": 3, "unanswerable": 1, "contexts": 2}
    assert result["cleaning"]["flagged"] == {"unanswerable": 1}
    assert result["cleaning"]["normalised"]["answer_start_located"] == 2
    assert result["stats"] is None


def test_inspect_text_output_names_each_cleaning_reason(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("context,question,answer\nSky is blue.,Colour?,blue\nSky is blue.,Colour?,blue\n"
                    "Sky is blue.,,blue\nGrass is green.,Colour?,red\n")
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 questions" in out and "after cleaning: 2 questions" in out
    for reason in ("duplicate", "empty_question", "answer_not_in_context"):
        assert reason in out


def test_inspect_with_model_option_column_flags_and_stats(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                        tiny_tokenizer) -> None:
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    path = tmp_path / "r.csv"
    path.write_text("review,question,span\nthe code is kilo .,what is the code?,kilo\n"
                    "the city is oslo .,what is the city?,ANSWERNOTFOUND\n")
    result = run_json(capsys, "data", "inspect", str(path), "--context-column", "review", "--answer-column",
                      "span", "--model", str(tok_dir), "--max-source-tokens", "64")
    assert result["loaded"]["unanswerable"] == 1
    assert result["stats"]["max_source_tokens"] == 64
    assert result["stats"]["source_tokens"]["max"] > 0
    assert result["stats"]["answers_checked"] == 1


def test_prepare_writes_grouped_seeded_splits_and_report(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rows = [{"id": f"{c}-{q}", "context": f"Topic {c} says the value is {c * 7}.", "question": f"q{q} about {c}?",
             "answer": str(c * 7)} for c in range(30) for q in range(3)]
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data", "prepare", str(data), "--val-fraction", "0.2", "--test-fraction", "0.1", "--split-seed", "5"]
    report = run_json(capsys, *args, "--output", str(tmp_path / "a"))
    run_json(capsys, *args, "--output", str(tmp_path / "b"))
    contexts = {}
    for name in ("train", "validation", "test"):
        lines = (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()
        assert lines == (tmp_path / "b" / f"{name}.jsonl").read_text().splitlines()  # same seed, same files
        contexts[name] = {json.loads(line)["context"] for line in lines}
        assert report["splits"][name]["questions"] == len(lines)
    assert not contexts["train"] & contexts["validation"] and not contexts["train"] & contexts["test"]
    assert not contexts["validation"] & contexts["test"]
    assert (len(contexts["validation"]), len(contexts["test"])) == (6, 3)
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk["cleaning"]["total_in"] == 90 and on_disk["data_config"]["split_seed"] == 5


def test_prepare_report_counts_every_drop(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("context,question,answer\nSky is blue.,Colour?,blue\nSky is blue.,Colour?,blue\n"
                    "Grass is green.,Colour?,red\nSea is deep.,Depth?,deep\n")
    main(["data", "prepare", str(path), "--output", str(tmp_path / "out"), "--drop-answers-not-in-context",
          "--val-fraction", "0", "--test-fraction", "0"])
    capsys.readouterr()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["cleaning"]["dropped"] == {"answer_not_in_context": 1, "duplicate": 1}
    assert report["splits"]["train"]["questions"] == 2 == report["cleaning"]["total_out"]


def test_no_answer_values_and_drop_unanswerable_flags(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"context": "Ice is cold.", "question": "How is ice?", "answer": "cold"}\n'
                    '{"context": "Fire is hot.", "question": "How is water?", "answer": "n/a"}\n'
                    '{"context": "Sun is bright.", "question": "How is rain?", "answer": "NONE"}\n')
    result = run_json(capsys, "data", "inspect", str(path), "--no-answer-values", "n/a,NONE")
    assert result["loaded"]["unanswerable"] == 2
    result = run_json(capsys, "data", "inspect", str(path), "--no-answer-values", "n/a,NONE",
                      "--drop-unanswerable")
    assert result["cleaning"]["dropped"] == {"unanswerable": 2} and result["kept"]["questions"] == 1


BAD = {
    "missing file": (None, None),
    "malformed json": ("bad.json", '{"data": [\n  {"paragraphs": [}\n]}'),
    "malformed csv": ("bad.csv", 'context,question,answer\nok,fine?,ok\n"a "b" c",q?,a\n'),
    "missing column": ("cols.csv", "passage,question,answer\np,q?,a\n"),
    "not utf-8": ("latin.csv", "context,question,answer\nCaf\u00e9,q?,Caf\u00e9\n".encode("latin-1")),
    "empty dataset": ("empty.csv", "context,question,answer\n"),
    "squad wrong shape": ("shape.json", json.dumps({"data": [{"paragraphs": [
        {"context": "c", "qas": [{"id": "3", "answers": []}]}]}]})),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("action", ["inspect", "prepare"])
def test_bad_input_exits_non_zero_with_one_line(case: str, action: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    name, content = BAD[case]
    path = tmp_path / (name or "nope.json")
    if name:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = ["data", action, str(path)] + (["--output", str(tmp_path / "out")] if action == "prepare" else [])
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0
    assert len(lines) == 1 and str(path) in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_bad_flag_values_are_reported_by_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["data", "prepare", str(FIXTURES / "flat.csv"), "--output", str(tmp_path / "o"),
                 "--val-fraction", "0.7", "--test-fraction", "0.5"])
    err = capsys.readouterr().err
    assert code != 0 and "--val-fraction + --test-fraction must be below 1" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- shared data

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real QA data) is absent")
SQUAD_FILES = [
    "tydiqa_goldp_en/english_tydiqa_train.json", "tydiqa_goldp_en/english_tydiqa_dev.json",
    "qed/qed-early-train.squad.json", "qed/qed-early-dev.squad.json",
    "covid_qa/200423_covidQA.json", "cmrc2018/cmrc2018_trial.json",
]


def count_squad(path: Path) -> tuple[int, int]:
    """(questions, answers whose answer_start is wrong but whose text occurs in the context), counted directly."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    questions = off = 0
    for article in data:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                questions += 1
                first = qa["answers"][0]
                text, start = first["text"], first["answer_start"]
                off += bool(text) and start >= 0 and context[start:start + len(text)] != text and text in context
    return questions, off


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("name", SQUAD_FILES)
def test_inspect_counts_every_shared_squad_file(name: str, capsys: pytest.CaptureFixture) -> None:
    path = SHARED_DATA / name
    questions, off = count_squad(path)
    result = run_json(capsys, "data", "inspect", str(path))
    assert result["format"] == "squad"
    assert result["loaded"]["questions"] == result["cleaning"]["total_in"] == questions
    assert result["cleaning"]["normalised"].get("answer_start_repaired", 0) == off
    dropped = sum(result["cleaning"]["dropped"].values())
    assert result["cleaning"]["total_out"] == questions - dropped


@pytest.mark.shared_data
@needs_shared
def test_known_shared_figures() -> None:
    """The README's figures, counted by hand once, guard count_squad itself."""
    assert count_squad(SHARED_DATA / "tydiqa_goldp_en/english_tydiqa_train.json")[0] == 3696
    assert count_squad(SHARED_DATA / "qed/qed-early-train.squad.json")[0] == 7167
    assert count_squad(SHARED_DATA / "covid_qa/200423_covidQA.json") == (1380, 234)
    assert count_squad(SHARED_DATA / "cmrc2018/cmrc2018_trial.json")[0] == 1002


@pytest.mark.shared_data
@needs_shared
def test_subjqa_csv_maps_by_columns(capsys: pytest.CaptureFixture) -> None:
    path = SHARED_DATA / "subjqa/restaurants/train.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    result = run_json(capsys, "data", "inspect", str(path), "--context-column", "review",
                      "--answer-column", "human_ans_spans")
    assert result["loaded"]["questions"] == len(rows) == 2561
    assert result["loaded"]["unanswerable"] == sum(r["human_ans_spans"] == "ANSWERNOTFOUND" for r in rows) == 1465
    dupes = len(rows) - len({(r["review"], r["question"], r["human_ans_spans"]) for r in rows})
    assert result["cleaning"]["dropped"].get("duplicate", 0) >= dupes


@pytest.mark.shared_data
@needs_shared
def test_pubmedqa_and_qed_jsonlines(capsys: pytest.CaptureFixture) -> None:
    result = run_json(capsys, "data", "inspect", str(SHARED_DATA / "pubmedqa/ori_pqal.json"))
    assert result["format"] == "pubmedqa" and result["loaded"]["questions"] == 1000
    result = run_json(capsys, "data", "inspect", str(SHARED_DATA / "qed/qed-dev.jsonlines"))
    assert result["loaded"]["questions"] == 1355 and result["loaded"]["unanswerable"] == 0


@pytest.mark.shared_data
@needs_shared
def test_qed_train_loads_every_question() -> None:
    from t5qa.data import load_dataset

    examples, report = load_dataset(SHARED_DATA / "qed/qed-early-train.squad.json")
    assert report.total_in == 7167 and len(examples) == report.total_out


@pytest.mark.shared_data
@pytest.mark.skipif(not T5_TOKENIZER.is_dir(), reason="../shared/data/t5-small-tokenizer is absent")
def test_inspect_cmrc2018_with_t5_tokenizer_recommends_a_multilingual_model(capsys: pytest.CaptureFixture) -> None:
    result = run_json(capsys, "data", "inspect", str(SHARED_DATA / "cmrc2018/cmrc2018_trial.json"),
                      "--model", str(T5_TOKENIZER))
    assert result["stats"]["unk_rate"] > 0.5
    assert any("mT5 or ByT5" in r for r in result["stats"]["recommendations"])
