"""A calibrated "no answer": the F1-best threshold, margins measured by both backends, applied where saved."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthetic_copy_examples
from t5qa.config import GenerateConfig
from t5qa.noanswer import EDGE, apply_threshold, choose_threshold
from t5qa.predict import Predictor


def _total(threshold: float, margins, scores, answerable) -> float:
    return sum(s if m >= threshold else float(not a) for m, s, a in zip(margins, scores, answerable))


QUESTIONS = st.lists(st.tuples(st.integers(-6, 6).map(lambda k: k / 2),  # few values: ties are common
                               st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.booleans()), max_size=30)


@settings(max_examples=300, deadline=None)
@given(QUESTIONS)
def test_the_chosen_threshold_is_the_f1_best_one(questions) -> None:
    margins = [m for m, _, _ in questions]
    # An unanswerable question answered with a non-empty answer scores 0 under SQuAD v2.0.
    scores = [s if a else 0.0 for _, s, a in questions]
    answerable = [a for _, _, a in questions]
    threshold, best = choose_threshold(margins, scores, answerable)
    # Every cut one threshold can make: between distinct margins, and beyond both ends.
    cuts = sorted(set(margins)) + [max(margins, default=0.0) + 1.0]
    achievable = max((_total(c, margins, scores, answerable) for c in cuts), default=0.0)
    assert _total(threshold, margins, scores, answerable) == pytest.approx(achievable)
    assert best * max(len(questions), 1) == pytest.approx(achievable)


def test_a_known_validation_set() -> None:
    # Margins 3, 2, 1, 0, -1: the two most confident are answerable and right, then an unanswerable one, then a
    # half-right answerable one, then an unanswerable one. Answering the first two is best: 2 + 1 + 0 + 1 = 4 of 5.
    margins = [3.0, 2.0, 1.0, 0.0, -1.0]
    scores = [1.0, 1.0, 0.0, 0.5, 0.0]
    answerable = [True, True, False, True, False]
    threshold, best = choose_threshold(margins, scores, answerable)
    assert threshold == 1.5 and best == pytest.approx(0.8)
    assert choose_threshold([1.0, 2.0], [0.0, 0.0], [False, False]) == (2.0 + EDGE, 1.0)  # answer none
    assert choose_threshold([1.0, 2.0], [1.0, 1.0], [True, True]) == (1.0 - EDGE, 1.0)  # answer all
    assert [apply_threshold("x", m, 1.5) for m in margins] == ["x", "x", "", "", ""]
    assert apply_threshold("x", None, 1.5) == "x" and apply_threshold("x", -9.0, None) == "x"
    with pytest.raises(ValueError, match="finite"):
        choose_threshold([math.inf], [1.0], [True])


@pytest.fixture(scope="module")
def pairs():
    return [(ex.context, ex.question) for ex in synthetic_copy_examples(8, seed=13)]


def _first_step_logits(model, tokenizer, pairs):
    import torch

    from t5qa.config import DEFAULT_PROMPT_TEMPLATE
    from t5qa.encode import format_source

    sources = [format_source(DEFAULT_PROMPT_TEMPLATE, q, c) for c, q in pairs]
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    start = torch.full((len(pairs), 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        return model(**batch, decoder_input_ids=start).logits[:, 0]


@pytest.fixture(scope="module")
def hesitant_model_dir(tiny_model_dir: Path, pairs, tmp_path_factory) -> Path:
    """tiny_model_dir with its </s> output row moved so that about half of `pairs` get the empty answer (the tiny
    model itself never chooses it), so both kinds of candidate are exercised."""
    import torch

    from t5qa.modeling import load_model, read_meta, save_model

    model, tokenizer = load_model(str(tiny_model_dir))
    model.eval()
    eos = tokenizer.eos_token_id
    logits = _first_step_logits(model, tokenizer, pairs)
    others = logits.clone()
    others[:, eos] = -math.inf
    gaps = others.max(-1).values - logits[:, eos]  # how far </s> is from winning, per input
    row = model.get_output_embeddings().weight
    direction = row.detach().mean(0)
    with torch.no_grad():  # the logit change is linear in the step: measure one, then take the median input's
        row[eos] += direction
        change = _first_step_logits(model, tokenizer, pairs)[:, eos] - logits[:, eos]
        row[eos] -= direction
        row[eos] += direction * float((gaps / change).median()) * 1.0001
    out = tmp_path_factory.mktemp("hesitant") / "model"
    save_model(model, tokenizer, out, read_meta(tiny_model_dir))
    return out


@pytest.mark.parametrize("beams", [1, 3])
def test_margins_are_the_answer_against_the_empty_answer(hesitant_model_dir: Path, pairs, beams) -> None:
    tiny_model_dir = hesitant_model_dir
    predictor = Predictor.from_pretrained(tiny_model_dir, generate=GenerateConfig(max_new_tokens=4, num_beams=beams))
    own = predictor.answer_many(pairs)
    measured = predictor.answer_many(pairs, measure_no_answer=True)
    assert [a.text for a in measured] == [a.text for a in own]  # measuring changes no answer
    assert all(a.margin is not None and a.candidate for a in measured)  # every window has a non-empty candidate
    for a in measured:
        if a.text:
            assert a.candidate == a.text
    if beams == 1:  # both kinds of candidate are exercised (beam search, scoring by length, rarely ends at once)
        assert any(not a.text for a in own) and any(a.text for a in own)
    # The empty answer's log-probability is the first step's: the same with and without beams, and for greedy
    # answers the margin is their own score against it.
    greedy = Predictor.from_pretrained(tiny_model_dir, generate=GenerateConfig(max_new_tokens=4))
    again = greedy.answer_many(pairs, measure_no_answer=True)
    assert [a.no_answer_score for a in measured] == pytest.approx([a.no_answer_score for a in again], abs=1e-5)
    assert all(a.no_answer_score < 0 for a in again)
    for a in again:
        if a.text:
            assert a.margin == pytest.approx(a.score - a.no_answer_score)
        else:
            assert a.score == pytest.approx(a.no_answer_score, abs=1e-5)  # the empty answer is </s> alone
    answered = predictor.answer_many(pairs, no_answer_margin=min(a.margin for a in measured) - 1)
    assert [a.text for a in answered] == [a.candidate for a in measured]  # a low threshold answers everything
    assert all(a.text == "" for a in predictor.answer_many(pairs, no_answer_margin=max(a.margin for a in measured)
                                                           + 1))
    middle = sorted(a.margin for a in measured)[len(pairs) // 2]
    assert [a.text for a in predictor.answer_many(pairs, no_answer_margin=middle)] == [
        a.candidate if a.margin >= middle else "" for a in measured]


def test_the_saved_threshold_is_applied_unless_turned_off(hesitant_model_dir: Path, tmp_path: Path, pairs) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(hesitant_model_dir, model_dir)
    measured = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4)).answer_many(
        pairs, measure_no_answer=True)
    meta = json.loads((model_dir / "t5qa.json").read_text())
    meta["no_answer"] = {"threshold": min(a.margin for a in measured) - 1.0}
    (model_dir / "t5qa.json").write_text(json.dumps(meta))
    calibrated = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4))
    assert [a.text for a in calibrated.answer_many(pairs)] == [a.candidate for a in measured]
    assert calibrated.generate_settings().no_answer_margin == meta["no_answer"]["threshold"]
    plain = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4, calibrated_no_answer=False))
    assert [a.text for a in plain.answer_many(pairs)] == [a.text for a in measured]
    assert [a.text for a in measured] != [a.candidate for a in measured]  # so the threshold made a difference


def test_ct2_measures_the_same_margins(chatty_model_dir: Path, tmp_path: Path, pairs) -> None:
    pytest.importorskip("ctranslate2", reason="the ct2 extra (ctranslate2) is not installed")
    from t5qa.export import export_ct2

    out = export_ct2(chatty_model_dir, tmp_path / "ct2", check_examples=0)
    generate = GenerateConfig(max_new_tokens=4)
    torch_answers = Predictor.from_pretrained(chatty_model_dir, generate=generate).answer_many(
        pairs, measure_no_answer=True)
    ct2_answers = Predictor.from_pretrained(out, backend="ct2", generate=generate).answer_many(
        pairs, measure_no_answer=True)
    assert [a.candidate for a in ct2_answers] == [a.candidate for a in torch_answers]
    for c, t in zip(ct2_answers, torch_answers):
        assert c.margin == pytest.approx(t.margin, abs=1e-3)


def _mixed_data(model_dir: Path, pairs, path: Path) -> tuple[list, float]:
    """The pairs as data whose F1-best threshold is known: the more confident half answerable, with the model's
    own candidate as the reference; the rest unanswerable. Returns the measured answers and a threshold between."""
    import dataclasses

    from t5qa.data import write_jsonl

    measured = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4)).answer_many(
        pairs, measure_no_answer=True)
    margins = sorted(a.margin for a in measured)
    cut = (margins[len(margins) // 2 - 1] + margins[len(margins) // 2]) / 2
    examples = [dataclasses.replace(ex, answers=(a.candidate,) if a.margin > cut else (), answer_starts=(-1,)
                                    if a.margin > cut else ())
                for ex, a in zip(synthetic_copy_examples(8, seed=13), measured)]
    write_jsonl(examples, path)
    return measured, cut


def test_evaluate_calibrates_the_threshold_saves_it_and_predict_applies_it(hesitant_model_dir: Path, tmp_path: Path,
                                                                         pairs, capsys) -> None:
    import shutil

    from t5qa import api
    from t5qa.cli import main
    from t5qa.errors import ConfigError

    model_dir = tmp_path / "model"
    shutil.copytree(hesitant_model_dir, model_dir)
    measured, cut = _mixed_data(model_dir, pairs, tmp_path / "validation.jsonl")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "validation.jsonl"),
                 "--max-new-tokens", "4", "--calibrate-no-answer"]) == 0
    printed = capsys.readouterr().out
    assert "no-answer threshold" in printed and "F1 " in printed and "NoAns F1" in printed
    saved = json.loads((model_dir / "t5qa.json").read_text())["no_answer"]
    margins = sorted(a.margin for a in measured)
    assert margins[len(margins) // 2 - 1] < saved["threshold"] < margins[len(margins) // 2]
    assert saved["after"]["f1"] == 100.0 and saved["before"]["f1"] < 100.0  # the model's own empties cost F1
    assert saved["after"]["NoAns_f1"] == 100.0 and "validation.jsonl (8 questions)" in saved["chosen_on"]

    answers = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4)).answer_many(pairs)
    assert [a.text for a in answers] == [a.candidate if a.margin > cut else "" for a in measured]
    evaluated = api.evaluate(model_dir, tmp_path / "validation.jsonl", generate=GenerateConfig(max_new_tokens=4))
    assert evaluated.metrics["f1"] == 100.0 and evaluated.no_answer is None  # applied, not chosen again
    own = api.evaluate(model_dir, tmp_path / "validation.jsonl",
                       generate=GenerateConfig(max_new_tokens=4, calibrated_no_answer=False))
    assert own.metrics["f1"] == pytest.approx(saved["before"]["f1"], abs=1e-3)

    with pytest.raises(ConfigError, match="every question in .* has an answer"):
        api.evaluate(model_dir, _answerable_copy(tmp_path), calibrate_no_answer=True)


def _answerable_copy(tmp_path: Path) -> Path:
    from t5qa.data import write_jsonl

    write_jsonl(synthetic_copy_examples(3, seed=2), tmp_path / "answerable.jsonl")
    return tmp_path / "answerable.jsonl"


def test_training_on_data_with_unanswerable_questions_saves_a_threshold(tiny_model_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    from t5qa import api
    from t5qa.data import write_jsonl

    examples = synthetic_copy_examples(30, seed=8)
    examples = [dataclasses.replace(ex, answers=(), answer_starts=()) if i % 3 == 0 else ex
                for i, ex in enumerate(examples)]
    write_jsonl(examples[:24], tmp_path / "train.jsonl")
    write_jsonl(examples[24:], tmp_path / "validation.jsonl")
    result = api.train(model=str(tiny_model_dir), train=str(tmp_path / "train.jsonl"),
                       validation=str(tmp_path / "validation.jsonl"), output=str(tmp_path / "run"), max_steps=2,
                       train_batch_size=4, max_source_tokens=128, eval_every_steps=2, seed=5)
    saved = json.loads((result.best_dir / "t5qa.json").read_text())["no_answer"]
    assert saved["step"] == 2 and math.isfinite(saved["threshold"])
    assert saved["after"]["f1"] >= saved["before"]["f1"]  # chosen on this data: never worse there
    assert {"HasAns_f1", "NoAns_f1"} <= set(saved["before"]) and {"HasAns_f1", "NoAns_f1"} <= set(saved["after"])
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [m for m in metrics if m.get("split") == "validation"][-1]
    assert validation["no_answer_threshold"] == saved["threshold"]
    assert validation["f1"] == pytest.approx(saved["after"]["f1"], abs=1e-3)
    assert Predictor.from_pretrained(result.best_dir).no_answer_threshold() == saved["threshold"]
    report = (result.output_dir / "report.md").read_text()
    assert "each evaluation chose the no-answer threshold" in report and "NoAns F1" in report


def test_the_server_applies_the_threshold_and_a_request_can_override_it(hesitant_model_dir: Path, pairs) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from t5qa.serve import create_app

    predictor = Predictor.from_pretrained(hesitant_model_dir, generate=GenerateConfig(max_new_tokens=4))
    measured = predictor.answer_many(pairs, measure_no_answer=True)
    predictor.saved_no_answer_threshold = min(a.margin for a in measured) - 1.0  # as if calibrated: answer all
    body = {"pairs": [{"context": c, "question": q} for c, q in pairs]}
    with TestClient(create_app(predictor)) as client:
        calibrated = client.post("/v1/answer", json=body).json()["answers"]
        assert [a["text"] for a in calibrated] == [a.candidate for a in measured]
        assert [a["margin"] for a in calibrated] == pytest.approx([a.margin for a in measured], abs=1e-5)
        strict = client.post("/v1/answer", json={**body, "no_answer_margin": 1000.0}).json()["answers"]
        assert [a["text"] for a in strict] == [""] * len(pairs)
        assert [a["candidate"] for a in strict] == [a.candidate for a in measured]
