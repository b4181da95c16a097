"""`t5qa predict`, `t5qa export` and `t5qa evaluate` on the command line."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import synthetic_copy_examples
from t5qa.cli import main
from t5qa.config import GenerateConfig
from t5qa.data import write_jsonl
from t5qa.errors import DataError
from t5qa.metrics import score_predictions
from t5qa.predict import Predictor


@pytest.fixture(scope="module")
def examples():
    return synthetic_copy_examples(6, seed=31)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    write_jsonl(examples, path)
    return path


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert not any("Traceback" in line for line in err)
    message = next(line for line in err if line.startswith("error:"))
    for needle in needles:
        assert needle in message
    return message


def test_predict_one_question(tiny_model_dir, capsys):
    context, question = "the code is kilo . the city is oslo .", "what is the code?"
    expected = Predictor.from_pretrained(tiny_model_dir, generate=GenerateConfig(min_new_tokens=2)).answer(
        context, question)
    rc = main(["predict", "--model", str(tiny_model_dir), "--context", context, "--question", question,
               "--min-new-tokens", "2"])
    assert rc == 0
    assert capsys.readouterr().out.rstrip("\n") == expected.text
    rc = main(["predict", "--model", str(tiny_model_dir), "--context", context, "--question", question,
               "--min-new-tokens", "2", "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert shown["text"] == expected.text and shown["num_windows"] == 1 and shown["window_index"] == 0
    assert shown["score"] == pytest.approx(expected.score, abs=1e-4)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_file_keeps_ids_and_order(tiny_model_dir, data_file, examples, tmp_path, suffix, capsys):
    out = tmp_path / f"answers{suffix}"
    rc = main(["predict", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out),
               "--batch-size", "4", "--no-progress", "--max-new-tokens", "3"])
    assert rc == 0
    assert f"wrote {len(examples)} answers" in capsys.readouterr().out
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        with out.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == [ex.id for ex in examples]
    expected = Predictor.from_pretrained(tiny_model_dir, generate=GenerateConfig(max_new_tokens=3)).answer_many(
        [(ex.context, ex.question) for ex in examples])
    assert [row["prediction"] for row in rows] == [a.text for a in expected]
    assert {"question", "score", "window", "num_windows"} <= set(rows[0])


def test_export_then_predict_with_ct2(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("ctranslate2")
    out = tmp_path / "ct2"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "ct2", "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "model.bin").is_file()
    args = ["predict", "--model", str(tiny_model_dir), "--context", "the code is kilo .", "--question",
            "what is the code?", "--json", "--min-new-tokens", "3"]
    assert main(args) == 0
    torch_answer = json.loads(capsys.readouterr().out)
    args[2] = str(out)
    assert main(args + ["--backend", "ct2"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == torch_answer["text"]
    # Exporting over an existing directory is refused without --force.
    rc = main(["export", "--model", str(tiny_model_dir), "--output", str(out)])
    _one_line_error(capsys, rc, "already exists")


@pytest.mark.parametrize("argv, needles", [
    (["--context", "c"], ["--context and --question"]),
    (["--data", "x.jsonl"], ["--data and --output"]),
    (["--context", "c", "--question", "q", "--data", "d.jsonl"], ["either"]),
    (["--data", "d.jsonl", "--output", "out.xml"], ["--output", ".jsonl"]),
    (["--context", "c", "--question", "q", "--num-beams", "0"], ["--num-beams"]),
])
def test_predict_flag_errors_are_one_line(tiny_model_dir, capsys, argv, needles):
    _one_line_error(capsys, main(["predict", "--model", str(tiny_model_dir), *argv]), *needles)


def test_predict_missing_model_and_data_are_one_line(tiny_model_dir, tmp_path, capsys):
    rc = main(["predict", "--model", str(tmp_path / "nope"), "--context", "c", "--question", "q"])
    _one_line_error(capsys, rc, "nope")
    rc = main(["predict", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"),
               "--output", str(tmp_path / "o.jsonl")])
    _one_line_error(capsys, rc, "missing.jsonl")


def test_evaluate_model(tiny_model_dir, data_file, examples, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    rc = main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out),
               "--json", "--max-examples", "4"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"loss", "token_accuracy", "exact_match", "f1", "count"} <= set(metrics)
    assert metrics["count"] == 4
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [ex.id for ex in examples[:4]]
    assert all(row["answer_in_input"] is True and row["window"] == 0 for row in rows)


def test_evaluate_predictions_file(data_file, examples, tmp_path, capsys):
    predictions = {examples[0].id: examples[0].answers[0], examples[1].id: "something else"}
    official = tmp_path / "official.json"
    official.write_text(json.dumps(predictions), encoding="utf-8")
    assert main(["evaluate", "--predictions", str(official), "--data", str(data_file), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    expected = score_predictions("squad", [(ex.id, predictions.get(ex.id), list(ex.answers)) for ex in examples])
    assert metrics == {"metric": "squad", **expected, "unmatched_predictions": 0}
    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in predictions.items()),
                     encoding="utf-8")
    assert main(["evaluate", "--predictions", str(lines), "--data", str(data_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    assert main(["evaluate", "--predictions", str(lines), "--data", str(data_file)]) == 0
    assert "exact_match" in capsys.readouterr().out  # the table


def test_evaluate_errors_are_one_line(tiny_model_dir, data_file, tmp_path, capsys):
    rc = main(["evaluate", "--data", str(data_file)])
    _one_line_error(capsys, rc, "--model", "--predictions")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prediction": "x"}\n{oops\n', encoding="utf-8")
    rc = main(["evaluate", "--predictions", str(bad), "--data", str(data_file)])
    _one_line_error(capsys, rc, "bad.jsonl:2")


def _questions_only(path, fmt: str, rows: list[dict]) -> None:
    import csv

    if fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:  # SQuAD JSON without "answers"
        qas = [{"id": r.get("id", str(k)), "question": r["question"]} for k, r in enumerate(rows)]
        path.write_text(json.dumps({"data": [{"paragraphs": [{"context": rows[0]["context"], "qas": qas}]}]}),
                        encoding="utf-8")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_predict_answers_files_with_only_context_and_question(tiny_model_dir, examples, tmp_path, fmt, capsys):
    rows = [{"context": ex.context, "question": ex.question} for ex in examples[:3]]
    if fmt == "json":
        rows = [{"context": examples[0].context, "question": q} for q in ("what is the code?", "what city?")]
    data = tmp_path / f"questions.{fmt}"
    _questions_only(data, fmt, rows)
    out = tmp_path / "answers.jsonl"
    assert main(["predict", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--no-progress"]) == 0
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["question"] for a in answers] == [r["question"] for r in rows]
    # ids are numbered from 1 (flat files) when the file has none
    assert fmt == "json" or [a["id"] for a in answers] == [str(k) for k in range(1, len(rows) + 1)]
    expected = Predictor.from_pretrained(tiny_model_dir).answer_many([(r["context"], r["question"]) for r in rows])
    assert [a["prediction"] for a in answers] == [e.text for e in expected]


@pytest.mark.parametrize("empty", ["question", "context"])
def test_predict_refuses_an_empty_question_or_context_naming_the_row(tiny_model_dir, tmp_path, empty, capsys):
    rows = [{"context": "the code is kilo .", "question": "what is the code?"},
            {"context": "the city is oslo .", "question": "what city?"}]
    rows[1][empty] = "  "
    data = tmp_path / "questions.csv"
    _questions_only(data, "csv", rows)
    rc = main(["predict", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "a.jsonl")])
    _one_line_error(capsys, rc, "questions.csv:row 2 (line 3)", f"empty {empty}")
    with pytest.raises(DataError, match=f"pair 0: empty {empty}"):
        Predictor.from_pretrained(tiny_model_dir).answer_many([(rows[1]["context"], rows[1]["question"])])
