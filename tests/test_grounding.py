"""Grounded answers (--grounded): always a span of the context, or empty, in greedy and beam search; in_context
and the answer's offsets on every answer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FILLER, KEYS, VALUES, synthetic_copy_examples
from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.grounding import SpanConstraint, find_in_context
from t5qa.predict import Predictor

WORDS = sorted(set(FILLER) | set(KEYS) | set(VALUES) | {"the", "is", "."})


def test_the_constraint_allows_only_continuations_of_a_run_of_the_context() -> None:
    constraint = SpanConstraint([[5, 6, 7, 5, 8, 3]], eos_id=1, never=[3])
    assert constraint.allowed(0, []) == [5, 6, 7, 8, 1]  # any context token (not the banned 3), or the end
    assert constraint.allowed(0, [5]) == [6, 8, 1]  # 5 is followed by 6 and by 8
    assert constraint.allowed(0, [5, 6]) == [7, 1]
    assert constraint.allowed(0, [5, 8]) == [1]  # 3 is banned: the span ends
    assert constraint.allowed(0, [6, 5]) == [1]  # not a run of the context
    assert constraint.allowed(0, [5, 6, 1]) == [1]  # finished


def test_find_in_context() -> None:
    context = "Fraud detection uses  anomaly detection, e.g. credit card fraud."
    start = context.index("anomaly")
    assert find_in_context("anomaly detection", context) == (start, start + len("anomaly detection"))
    start = context.index("credit")
    assert find_in_context("Credit Card", context) == (start, start + len("credit card"))
    start = context.index("uses")
    assert find_in_context("uses anomaly", context) == (start, start + len("uses  anomaly"))  # two spaces there
    assert find_in_context("a bank", context) is None and find_in_context("  ", context) is None
    assert find_in_context("信用卡", "例如信用 卡欺诈") == (2, 6)


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Predictor:
    return Predictor.from_pretrained(tiny_model_dir, generate=GenerateConfig(max_new_tokens=5, batch_size=4))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), beams=st.sampled_from([1, 3]), words=st.integers(3, 60))
def test_a_grounded_answer_is_always_a_span_of_its_context(predictor: Predictor, seed: int, beams: int,
                                                            words: int) -> None:
    rng = random.Random(seed)
    pairs = [(" ".join(rng.choice(WORDS) for _ in range(words)), f"what is the {rng.choice(KEYS)}?")
             for _ in range(3)]
    for answer, (context, _) in zip(predictor.answer_many(pairs, grounded=True, num_beams=beams), pairs):
        if answer.text:
            assert answer.in_context is True, (answer.text, context)
            start, end = answer.answer_char_start, answer.answer_char_end
            assert find_in_context(answer.text, context[start:end]) is not None
        else:
            assert answer.in_context is None


def test_grounding_changes_answers_that_are_not_in_the_context(predictor: Predictor) -> None:
    pairs = [(ex.context, ex.question) for ex in synthetic_copy_examples(6, seed=3)]
    free = predictor.answer_many(pairs)
    assert any(a.in_context is False for a in free)  # the random model makes things up
    grounded = predictor.answer_many(pairs, grounded=True)
    assert all(a.in_context is not False for a in grounded)
    long_context = " ".join(ex.context for ex in synthetic_copy_examples(4, seed=9))  # several windows
    small = Predictor(predictor.model, predictor.tokenizer, EncodeConfig(max_source_tokens=48, stride_tokens=8),
                      GenerateConfig(max_new_tokens=4, grounded=True))
    answer = small.answer(long_context, "what is the code?")
    assert answer.num_windows > 1 and answer.in_context is not False


def test_evaluate_reports_the_share_of_answers_in_their_context(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa import api
    from t5qa.data import write_jsonl

    write_jsonl(synthetic_copy_examples(6, seed=3), tmp_path / "data.jsonl")
    free = api.evaluate(tiny_model_dir, tmp_path / "data.jsonl", generate=GenerateConfig(max_new_tokens=4))
    grounded = api.evaluate(tiny_model_dir, tmp_path / "data.jsonl",
                            generate=GenerateConfig(max_new_tokens=4, grounded=True))
    assert free.metrics["answers_in_context"] < 100.0 and grounded.metrics["answers_in_context"] == 100.0
    assert all(row["in_context"] is not False for row in grounded.predictions)


def test_ct2_grounded_answers_are_in_their_context_or_empty(chatty_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2", reason="the ct2 extra (ctranslate2) is not installed")
    from t5qa.export import export_ct2

    out = export_ct2(chatty_model_dir, tmp_path / "ct2", check_examples=0)
    pairs = [(ex.context, ex.question) for ex in synthetic_copy_examples(6, seed=5)]
    ct2 = Predictor.from_pretrained(out, backend="ct2", generate=GenerateConfig(max_new_tokens=3))
    assert all(a.in_context is not False for a in ct2.answer_many(pairs, grounded=True))


def test_the_server_answers_grounded_with_the_answers_offsets(predictor: Predictor) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from t5qa.serve import create_app

    ex = synthetic_copy_examples(1, seed=3)[0]
    with TestClient(create_app(predictor)) as client:
        answer = client.post("/v1/answer", json={"context": ex.context, "question": ex.question,
                                                 "grounded": True}).json()["answer"]
    if answer["text"]:
        assert answer["in_context"] is True
        assert ex.context[answer["answer_char_start"]:answer["answer_char_end"]].lower() == answer["text"].lower()
    else:
        assert answer["in_context"] is None and answer["answer_char_start"] is None
