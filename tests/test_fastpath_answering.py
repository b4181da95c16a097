"""The CPU fast paths for answering (fastpath/answering.py): the same answers as transformers' `generate` on
every model family, greedy and beam search; oneDNN really runs; a path that gives other logits is refused in one
line; and they stay off where they were not written for."""

from __future__ import annotations

import logging

import pytest
import torch

from families import FAMILIES, build, byte_tokenizer
from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.fastpath import answering
from t5qa.fastpath import linear as fast_linear
from t5qa.predict import Predictor

needs_onednn = pytest.mark.skipif(not fast_linear.onednn_linear_available(),
                                  reason="this PyTorch has no oneDNN linear operator")

PAIRS = [
    ("the code is kilo . the city is oslo . the river is nile .", "what is the code?"),
    ("the city is oslo .", "what city?"),
    ("异常检测的示例是信用卡欺诈检测：银行根据交易记录找出可疑的交易。", "异常检测的示例是什么？"),
    ("alpha beta gamma delta " * 6, "which letter comes after beta?"),
    ("one two three", "how many?"),
]


def _predictor(model, tokenizer, **generate) -> Predictor:
    return Predictor(model, tokenizer, EncodeConfig(max_source_tokens=48, stride_tokens=12),
                     GenerateConfig(max_new_tokens=6, batch_size=2, **generate))


def _answers(predictor: Predictor) -> list[tuple[str, float]]:
    return [(a.text, round(a.score, 4)) for a in predictor.answer_many(PAIRS)]


@needs_onednn
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_answers_as_generate_on_every_family(family, num_beams, tiny_tokenizer, monkeypatch):
    tokenizer = byte_tokenizer() if family == "byt5" else tiny_tokenizer
    model = build(family, tokenizer).eval()
    calls = []
    onednn = fast_linear._onednn
    monkeypatch.setattr(fast_linear, "_onednn", lambda *a: calls.append(1) or onednn(*a))
    stock = _answers(_predictor(model, tokenizer, num_beams=num_beams, fast_answering=False))
    assert not calls
    fast_predictor = _predictor(model, tokenizer, num_beams=num_beams)
    fast = _answers(fast_predictor)
    assert "linear" in fast_predictor._runner.fast.used, fast_predictor._runner.fast.not_used
    assert calls, "the linear layers did not go through oneDNN"
    assert [text for text, _ in fast] == [text for text, _ in stock]
    assert [score for _, score in fast] == pytest.approx([score for _, score in stock], abs=1e-3)


@needs_onednn
def test_a_path_that_changes_the_logits_is_refused_in_one_line(tiny_model, monkeypatch, caplog):
    model, tokenizer = tiny_model
    stock = _answers(_predictor(model, tokenizer, fast_answering=False))
    onednn = fast_linear._onednn
    monkeypatch.setattr(fast_linear, "_onednn", lambda *a: onednn(*a) * 1.01)
    predictor = _predictor(model, tokenizer)
    with caplog.at_level(logging.WARNING, logger="t5qa.fastpath.answering"):
        answers = _answers(predictor)
    assert answers == stock
    assert "linear" not in predictor._runner.fast.used
    assert "logits differ" in predictor._runner.fast.not_used["linear"]
    lines = [r for r in caplog.records if r.name == "t5qa.fastpath.answering"]
    assert len(lines) == 1 and "linear not used" in lines[0].getMessage()
    predictor.answer_many(PAIRS)  # proven once per predictor: no second line
    assert len([r for r in caplog.records if r.name == "t5qa.fastpath.answering"]) == 1


def test_off_where_not_written_for(tiny_model):
    model, tokenizer = tiny_model
    fast = answering.FastAnswering(model.to(torch.bfloat16))
    assert fast.used == []
    assert "fp32 on the CPU" in fast.not_used["linear"] and "bfloat16" in fast.not_used["linear"]


def test_the_mode_leaves_other_calls_and_gradients_alone():
    weight = torch.randn(5, 3, requires_grad=True)
    rows = torch.randn(4, 3)
    with answering.OneDNNLinear():
        out = torch.nn.functional.linear(rows, weight)  # needs a gradient: the stock product
        out.sum().backward()
        half = torch.nn.functional.linear(rows.half(), weight.detach().half())
    assert weight.grad is not None and torch.allclose(weight.grad, rows.sum(0).expand(5, 3))
    assert half.dtype == torch.float16
