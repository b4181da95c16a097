"""`t5qa demo` in its quick mode: trains from scratch offline, prints EM/F1, the report path and an answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from t5qa.cli import main


def test_demo_quick_mode_prints_scores_report_and_answer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["demo", "--offline", "--output", str(tmp_path / "demo"), "--max-steps", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    scores = re.search(r"held-out test \(squad\): exact match (\d+\.\d), F1 (\d+\.\d) \((\d+) questions\)", out)
    assert scores, out
    assert 0.0 <= float(scores.group(1)) <= float(scores.group(2)) <= 100.0 and int(scores.group(3)) > 0
    report = Path(re.search(r"^report: (.+)$", out, re.M).group(1))
    assert report.is_file() and report.parent == tmp_path / "demo" / "run"
    assert "What is an example of anomaly detection?" in out
    assert re.search(r"^answer: '.*' \(reference: 'credit card fraud detection'\)$", out, re.M), out
    assert "trained from scratch" in out and "not the quality of a pretrained model" in out
    assert (tmp_path / "demo" / "run" / "best" / "model.safetensors").is_file()
    # The test contexts are held out: none of them was trained on.
    train = (tmp_path / "demo" / "data" / "train.jsonl").read_text()
    test_rows = (tmp_path / "demo" / "data" / "test.jsonl").read_text().splitlines()
    import json
    assert test_rows and all(json.loads(r)["context"] not in train for r in test_rows)


def test_chinese_demo_asks_the_tutorials_question_with_a_byte_model(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    code = main(["demo", "--lang", "zh", "--offline", "--output", str(tmp_path / "demo"), "--max-steps", "2",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"held-out test \(cmrc\): exact match \d+\.\d, F1 \d+\.\d \(\d+ questions\)", out), out
    assert "question: 异常检测的示例是什么？" in out
    assert re.search(r"^answer: '.*' \(reference: '信用卡欺诈交易'\)$", out, re.M), out
    assert "mt5-small" in out  # what to run where the Hub is reachable
    from transformers import AutoConfig, AutoTokenizer

    model_dir = tmp_path / "demo" / "scratch-model"
    assert type(AutoTokenizer.from_pretrained(model_dir)).__name__ == "ByT5Tokenizer"
    config = AutoConfig.from_pretrained(model_dir)
    assert config.feed_forward_proj == "gated-gelu" and config.vocab_size == 384
