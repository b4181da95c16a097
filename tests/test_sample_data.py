"""The bundled sample dataset (src/t5qa/sample_data) is well-formed SQuAD v1.1 JSON."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest

PACKAGE = "t5qa.sample_data"
FILES = ("ml_qa.json", "zh_qa.json")


def _load(name: str) -> dict[str, Any]:
    # importlib.resources reads the file the way an installed wheel would expose it.
    text = resources.files(PACKAGE).joinpath(name).read_text(encoding="utf-8")
    return json.loads(text)


def _paragraphs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for article in doc["data"] for p in article["paragraphs"]]


def _questions(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [qa for p in _paragraphs(doc) for qa in p["qas"]]


@pytest.mark.parametrize("name", FILES)
def test_squad_layout_and_no_empty_fields(name: str) -> None:
    doc = _load(name)
    assert doc["version"] == "t5qa-sample-1.0"
    assert doc["data"], f"{name}: no articles"
    for article in doc["data"]:
        assert article["title"].strip(), f"{name}: empty title"
        assert article["paragraphs"], f"{name}: {article['title']!r} has no paragraphs"
        for paragraph in article["paragraphs"]:
            assert paragraph["context"].strip(), f"{name}: empty context in {article['title']!r}"
            assert paragraph["qas"], f"{name}: context without questions in {article['title']!r}"
            for qa in paragraph["qas"]:
                assert qa["id"].strip() and qa["question"].strip(), f"{name}: {qa}"
                assert qa["answers"], f"{name}: {qa['id']} has no answers"
                for answer in qa["answers"]:
                    assert answer["text"].strip(), f"{name}: {qa['id']} has an empty answer"
                    # No stray whitespace: EM against a padded reference would be misleading.
                    assert answer["text"] == answer["text"].strip(), f"{name}: {qa['id']}"
                    assert isinstance(answer["answer_start"], int), f"{name}: {qa['id']}"


@pytest.mark.parametrize("name", FILES)
def test_every_answer_start_points_at_the_answer_text(name: str) -> None:
    doc = _load(name)
    wrong = []
    for paragraph in _paragraphs(doc):
        context = paragraph["context"]
        for qa in paragraph["qas"]:
            for answer in qa["answers"]:
                start = answer["answer_start"]
                if start < 0 or context[start : start + len(answer["text"])] != answer["text"]:
                    wrong.append((qa["id"], answer["text"], start))
    assert not wrong, f"{name}: answer_start does not match the answer text for {wrong}"


def test_ids_are_unique_across_both_files() -> None:
    ids = [qa["id"] for name in FILES for qa in _questions(_load(name))]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate ids: {duplicates}"


def test_english_file_is_large_enough_for_the_quickstart() -> None:
    doc = _load("ml_qa.json")
    assert len(_paragraphs(doc)) >= 30
    assert len(_questions(doc)) >= 150


def test_chinese_file_is_large_enough_and_chinese() -> None:
    doc = _load("zh_qa.json")
    assert len(_questions(doc)) >= 30
    for paragraph in _paragraphs(doc):
        cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in paragraph["context"])
        # Mostly Han characters; a few Latin names (ReLU, T5, AUC) are expected.
        assert cjk / len(paragraph["context"]) > 0.5, paragraph["context"][:40]


def test_anomaly_detection_example_question_is_present() -> None:
    matches = [
        (paragraph["context"], qa)
        for paragraph in _paragraphs(_load("ml_qa.json"))
        for qa in paragraph["qas"]
        if qa["question"] == "What is an example of anomaly detection?"
    ]
    assert len(matches) == 1
    context, qa = matches[0]
    assert [a["text"] for a in qa["answers"]] == ["credit card fraud detection"]
    for topic in ("clustering", "association rules", "anomaly detection"):
        assert topic in context


def test_files_are_valid_plain_json_on_disk() -> None:
    # The quickstart passes this path to `t5qa train`; it must parse without t5qa's helpers.
    for name in FILES:
        path = resources.files(PACKAGE).joinpath(name)
        with resources.as_file(path) as real_path, open(real_path, encoding="utf-8") as handle:
            assert json.load(handle) == _load(name)
