"""Error analysis (`t5qa.analysis`): EM and F1 by kind of example, in evaluate's output and the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t5qa.analysis import DIMENSIONS, UNKNOWN, breakdown, question_word


@pytest.mark.parametrize("question, word", [
    ("What is an example of anomaly detection?", "what / 什么"),
    ("How many moons does Mars have?", "how many / 多少"),
    ("how does it work", "how / 怎么"),
    ("In which year did it open?", "which / 哪"),
    ("Whose idea was it?", "who / 谁"),
    ("异常检测的示例是什么？", "what / 什么"),
    ("他什么时候出生？", "when / 何时"),
    ("长城在哪里？", "where / 哪里"),
    ("为什么天是蓝的？", "why / 为什么"),
    ("这座桥有多少米长？", "how many / 多少"),
    ("Name the capital of Norway.", "other"),
    ("Somewhat unclear", "other"),  # "what" inside a word is not the question word
])
def test_question_words_in_english_and_chinese(question: str, word: str) -> None:
    assert question_word(question) == word


ROW = st.fixed_dictionaries({
    "id": st.text(max_size=5),
    "question": st.sampled_from(["what is it?", "who?", "谁写的？", "多少？", "tell me", ""]),
    "prediction": st.one_of(st.none(), st.text(max_size=8)),
    "references": st.one_of(st.just([]), st.lists(st.text(max_size=12), min_size=1, max_size=3)),
    "exact_match": st.sampled_from([0.0, 1.0]),
    "f1": st.floats(0.0, 1.0),
}, optional={
    "context_chars": st.integers(0, 9000),
    "answer_position": st.one_of(st.none(), st.floats(0.0, 0.999)),
    "window": st.one_of(st.none(), st.integers(0, 6)),
    "answer_in_input": st.one_of(st.none(), st.booleans()),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(ROW, max_size=40))
def test_every_row_is_in_exactly_one_bucket_of_every_dimension(rows: list[dict]) -> None:
    table = breakdown(rows)
    assert list(table) == list(DIMENSIONS)
    for dimension, buckets in table.items():
        assert sum(b["count"] for b in buckets) == len(rows), dimension
        assert len({b["bucket"] for b in buckets}) == len(buckets)
        if rows:  # the buckets' means recombine into the overall mean
            total_f1 = sum(b["f1"] * b["count"] for b in buckets) / len(rows)
            assert total_f1 == pytest.approx(100 * sum(r["f1"] for r in rows) / len(rows), abs=1e-6)
        assert all(0.0 <= b["exact_match"] <= 100.0 and 0.0 <= b["f1"] <= 100.0 for b in buckets)
        unknown = [i for i, b in enumerate(buckets) if b["bucket"] == UNKNOWN]
        assert unknown in ([], [len(buckets) - 1])  # "unknown" comes last


def test_buckets_hold_the_right_rows_and_their_worst_examples() -> None:
    rows = [
        {"id": "a", "question": "what?", "prediction": "x", "references": ["kilo"], "exact_match": 1.0, "f1": 1.0,
         "context_chars": 100, "answer_position": 0.1, "window": 0, "answer_in_input": True},
        {"id": "b", "question": "what else?", "prediction": "", "references": ["two words"], "exact_match": 0.0,
         "f1": 0.0, "context_chars": 2500, "answer_position": 0.9, "window": 3, "answer_in_input": False},
        {"id": "c", "question": "谁？", "prediction": "张", "references": ["张三"], "exact_match": 0.0, "f1": 0.5,
         "context_chars": 600, "answer_position": 0.3, "window": 1, "answer_in_input": True},
    ]
    table = {name: {b["bucket"]: b for b in buckets} for name, buckets in breakdown(rows).items()}
    assert table["question word"]["what / 什么"]["count"] == 2 and table["question word"]["what / 什么"]["f1"] == 50
    assert table["question word"]["what / 什么"]["worst"][0]["id"] == "b"
    assert table["question word"]["who / 谁"]["exact_match"] == 0 and table["question word"]["who / 谁"]["f1"] == 50
    assert set(table["context length"]) == {"< 500 chars", "500-999", "2,000-3,999"}
    assert table["answer length"]["1 segment"]["count"] == 1  # "kilo"
    assert table["answer length"]["2-3"]["count"] == 2  # "two words", and 张三 (two characters)
    assert table["answer position"]["last quarter"]["worst"][0]["id"] == "b"
    assert table["window"]["window 4 or later"]["count"] == 1
    assert table["answer in input"]["no"]["f1"] == 0 and table["prediction"]["empty"]["count"] == 1


def test_evaluate_writes_the_breakdown_next_to_its_rows(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from t5qa.cli import main
    from test_train import make_data

    data = make_data(tmp_path)
    out = tmp_path / "eval" / "rows.jsonl"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data["validation"]),
                 "--output", str(out)]) == 0
    assert "error analysis" in capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "rows.breakdown.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert saved["rows"] == len(rows) == 6
    assert all(sum(b["count"] for b in buckets) == 6 for buckets in saved["breakdown"].values())
    assert all("context_chars" in r and "answer_position" in r for r in rows)


def test_the_run_report_shows_the_breakdown(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit
    from test_train import tiny_config

    result = fit(tiny_config(tiny_model_dir, tmp_path, max_steps=2))
    report = (result.output_dir / "report.md").read_text()
    assert "## Error analysis" in report and "## By question word" in report
    assert "em_f1_breakdown.png" in report and (result.output_dir / "em_f1_breakdown.png").stat().st_size > 0
    assert (result.output_dir / "eval_predictions.breakdown.json").is_file()


def test_the_breakdown_chart_draws_every_label_with_or_without_a_chinese_font(tmp_path: Path, monkeypatch) -> None:
    import warnings

    from t5qa import report

    rows = [{"id": str(i), "question": q, "prediction": "x", "references": ["x"], "exact_match": 1.0, "f1": 1.0,
             "context_chars": 100, "answer_position": 0.1, "window": 0, "answer_in_input": True}
            for i, q in enumerate(["what?", "谁？", "为什么？"])]
    monkeypatch.setattr(report, "_cjk_font", lambda: None)  # as on a machine with matplotlib's fonts only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" would fail here
        report._plot_breakdown(tmp_path / "chart.png", breakdown(rows))
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report._drawable("who / 谁", None) == "who" and report._drawable("who / 谁", "Noto Sans CJK SC") == "who / 谁"
