"""The lean greedy loop (fastpath/decoding.py): the same answers, scores and no-answer margins as transformers'
`generate` on every T5-family model, with answers of many lengths (so finished rows leave the batch), grounded
and not, with a minimum length; refused in one line when its logits differ; off where it was not written for."""

from __future__ import annotations

import logging

import pytest
import torch

from families import FAMILIES, build, byte_tokenizer
from test_fastpath_answering import PAIRS as ANSWERING_PAIRS
from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.encode import pad_batch
from t5qa.fastpath import decoding
from t5qa.grounding import SpanConstraint
from t5qa.predict import Predictor

LEAN_FAMILIES = ["t5-v1.0", "t5-v1.1", "mt5", "byt5"]
PAIRS = [*ANSWERING_PAIRS, ("the river is nile . the code is kilo .", "what river?"),
         ("kilo oslo nile alpha beta", "what comes first?"), ("the city is oslo . one two three", "which city?")]
MAX_NEW = 10


def _predictor(model, tokenizer, **generate) -> Predictor:
    return Predictor(model, tokenizer, EncodeConfig(max_source_tokens=48, stride_tokens=12),
                     GenerateConfig(**{"max_new_tokens": MAX_NEW, "batch_size": 8, **generate}))


def _ending_model(family: str, tokenizer, move_eos: bool = True):
    """A tiny model of `family` whose greedy answers end at many different steps (the untrained model never
    chooses </s>): its </s> output row is moved toward the mean row of the tokens it chooses, by the share, of a few tried, that
    gives the most different answer lengths."""
    model = build(family, tokenizer).eval()
    out_rows, in_rows = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    eos = tokenizer.eos_token_id
    windows = [item.window.input_ids for item in _predictor(model, tokenizer)._encode(PAIRS)]
    ids, mask = pad_batch(windows, tokenizer.pad_token_id)
    inputs = {"input_ids": ids, "attention_mask": mask}

    def generate():
        return model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)[:, 1:]

    def lengths() -> set[int]:
        ended = (generate() == eos).long()
        return {int(row.argmax()) if row.any() else MAX_NEW for row in ended}

    with torch.no_grad():
        out_rows[tokenizer.pad_token_id] = 0  # an untrained model otherwise answers its start token forever
        in_rows[tokenizer.pad_token_id] = 0
        if not move_eos:
            return model
        row = out_rows[eos].clone()
        target = out_rows[generate().unique()].mean(0)
        tried = {}
        for share in (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.4):
            out_rows[eos] = row + share * (target - row)
            tried[share] = len(lengths())
        out_rows[eos] = row + max(tried, key=tried.get) * (target - row)
    return model


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_same_answers_scores_and_margins_as_generate(family, tiny_tokenizer, monkeypatch):
    tokenizer = byte_tokenizer() if family == "byt5" else tiny_tokenizer
    model = _ending_model(family, tokenizer)
    calls = []
    original = decoding.LeanGreedy.decode
    monkeypatch.setattr(decoding.LeanGreedy, "decode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for settings in ({}, {"min_new_tokens": 2}, {"grounded": True}):
        stock = _predictor(model, tokenizer, fast_answering=False, **settings).answer_many(PAIRS, measure_no_answer=True)
        assert not calls
        fast_predictor = _predictor(model, tokenizer, **settings)
        fast = fast_predictor.answer_many(PAIRS, measure_no_answer=True)
        assert "decoding" in fast_predictor._runner.fast.used, fast_predictor._runner.fast.not_used
        assert calls, "the lean loop did not answer"
        calls.clear()
        assert [a.text for a in fast] == [a.text for a in stock], settings
        assert [a.score for a in fast] == pytest.approx([a.score for a in stock], abs=1e-4)
        assert [a.candidate for a in fast] == [a.candidate for a in stock]
        assert [a.margin for a in fast] == pytest.approx([a.margin for a in stock], abs=1e-4)


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_rows_that_finish_leave_the_batch_and_change_no_answer(family, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(decoding, "COMPACT_SHARE", 0.01)  # every finished row leaves at once
    tokenizer = byte_tokenizer() if family == "byt5" else tiny_tokenizer
    ending, plain = _ending_model(family, tokenizer), _ending_model(family, tokenizer, move_eos=False)
    items = _predictor(plain, tokenizer)._encode(PAIRS)
    ids, mask = pad_batch([item.window.input_ids for item in items], tokenizer.pad_token_id)
    contexts = tokenizer([item.context for item in items], add_special_tokens=False)["input_ids"]
    spans = SpanConstraint(contexts, tokenizer.eos_token_id, [tokenizer.unk_token_id, tokenizer.pad_token_id])
    # The untrained model repeats its first token: with </s> moved, rows end at their first step or run to the
    # limit; grounded, the plain model's rows end where their spans of the context cannot go on, at many steps.
    for model, allowed, fn in ((ending, None, None), (plain, spans.allowed, spans.for_generate())):
        loop = decoding.LeanGreedy(model)
        decoded = loop.decode(ids, mask, max_new_tokens=MAX_NEW, allowed=allowed)
        stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                               num_beams=1, prefix_allowed_tokens_fn=fn)[:, 1:]
        ended = (stock == tokenizer.eos_token_id).long()
        lengths = {int(row.argmax()) if row.any() else MAX_NEW for row in ended}
        assert len(lengths) >= (2 if allowed is None else 3), lengths
        assert loop.compactions > 0
        assert torch.equal(decoded.tokens[:, :stock.shape[1]], stock)
        assert bool((decoded.tokens[:, stock.shape[1]:] == loop.pad_id).all())


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_an_encoder_in_chunks_of_similar_length_changes_no_answer(family, tiny_tokenizer, monkeypatch):
    tokenizer = byte_tokenizer() if family == "byt5" else tiny_tokenizer
    model = _ending_model(family, tokenizer)
    windows = sorted((item.window.input_ids for item in _predictor(model, tokenizer)._encode(PAIRS)), key=len)
    # Mixed lengths, as in a server's batch: chunks save padding (a byte model's windows are all long: cut some).
    windows = windows[-3:] + [w[:max(4, len(w) // 3)] for w in windows[:4]]
    ids, mask = pad_batch(windows, tokenizer.pad_token_id)
    lengths = mask.sum(-1)
    assert int(lengths.min()) < 0.5 * int(lengths.max())
    encoded_shapes = []
    encode = decoding.LeanGreedy._encode
    monkeypatch.setattr(decoding.LeanGreedy, "_encode",
                        lambda self, i, m, w: encoded_shapes.append(tuple(i.shape)) or encode(self, i, m, w))
    monkeypatch.setattr(decoding, "CHUNK_ROWS", 2)
    loop = decoding.LeanGreedy(model)
    one_pass = loop.decode(ids, mask, max_new_tokens=MAX_NEW, chunk_rows=0)
    assert encoded_shapes == [tuple(ids.shape)]
    encoded_shapes.clear()
    chunked = loop.decode(ids, mask, max_new_tokens=MAX_NEW)  # the saving decides: chunks of 2
    assert len(encoded_shapes) == -(-ids.shape[0] // 2)
    assert sum(rows * n for rows, n in encoded_shapes) < ids.numel()  # padding left out
    stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                           num_beams=1)[:, 1:]
    assert torch.equal(chunked.tokens[:, :stock.shape[1]], stock)
    assert torch.equal(chunked.tokens, one_pass.tokens)
    assert torch.allclose(chunked.first_logits, one_pass.first_logits, atol=1e-4, rtol=0)


def test_the_proof_runs_the_encoder_both_ways(tiny_tokenizer, monkeypatch):
    model = _ending_model("t5-v1.1", tiny_tokenizer)
    seen = []
    original = decoding.LeanGreedy.decode
    monkeypatch.setattr(decoding.LeanGreedy, "decode",
                        lambda self, *a, **k: seen.append(k.get("chunk_rows")) or original(self, *a, **k))
    items = _predictor(model, tiny_tokenizer)._encode(PAIRS)
    ids, mask = pad_batch([item.window.input_ids for item in items], tiny_tokenizer.pad_token_id)
    assert decoding.LeanDecoding(model).prove(ids, mask) is None
    assert sorted(seen) == [0, 1]
    # Cross-attention keys and values that come out wrong only when the encoder runs in chunks are refused.
    cross = decoding.LeanGreedy._cross_keys_values
    monkeypatch.setattr(decoding.LeanGreedy, "_cross_keys_values",
                        lambda self, i, m, w, rows: cross(self, i, m, w, rows) + (0.5 if rows else 0.0))
    why = decoding.LeanDecoding(model).prove(ids, mask)
    assert why is not None and "encoder in chunks" in why


def test_batches_are_larger_where_the_lean_loop_answers_unless_the_user_sets_one(tiny_tokenizer, monkeypatch):
    from t5qa import predict

    monkeypatch.setattr(predict, "LEAN_BATCH_SIZE", 4)
    monkeypatch.setattr(predict, "DEFAULT_BATCH_SIZE", 3)
    model = _ending_model("t5-v1.1", tiny_tokenizer)
    shapes = []
    original = decoding.LeanGreedy.decode
    monkeypatch.setattr(decoding.LeanGreedy, "decode",
                        lambda self, ids, *a, **k: (None if k.get("keep_step_logits") else shapes.append(ids.shape[0]))
                        or original(self, ids, *a, **k))  # the proof's calls keep their logits: not counted
    auto = _predictor(model, tiny_tokenizer, batch_size=None)
    assert auto.batch_size() == 4 and auto.batch_size(GenerateConfig(num_beams=2)) == 3
    windows = len(auto._encode(PAIRS))
    auto.answer_many(PAIRS)
    assert shapes == [4] * (windows // 4) + ([windows % 4] if windows % 4 else [])
    assert _predictor(model, tiny_tokenizer, batch_size=2).batch_size() == 2
    refused = _predictor(model, tiny_tokenizer, batch_size=None)
    monkeypatch.setattr(decoding, "_differs", lambda *a: "logits differ (for this test)")
    refused.answer_many(PAIRS[:2])
    assert refused.batch_size() == 3  # generate answers: the plain default


def test_grounded_answers_stay_in_their_context(tiny_tokenizer):
    model = _ending_model("t5-v1.1", tiny_tokenizer)
    predictor = _predictor(model, tiny_tokenizer, grounded=True)
    answers = predictor.answer_many(PAIRS)
    assert "decoding" in predictor._runner.fast.used
    assert any(a.text for a in answers)
    assert all(a.in_context for a in answers if a.text)


def test_logits_that_differ_are_refused_in_one_line(tiny_tokenizer, monkeypatch, caplog):
    model = _ending_model("t5-v1.0", tiny_tokenizer)
    stock = [a.text for a in _predictor(model, tiny_tokenizer, fast_answering=False).answer_many(PAIRS)]
    rms = decoding._rms
    monkeypatch.setattr(decoding, "_rms", lambda x, norm: rms(x, norm) * 1.01)
    predictor = _predictor(model, tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="t5qa.fastpath.answering"):
        answers = [a.text for a in predictor.answer_many(PAIRS)]
        predictor.answer_many(PAIRS)  # decided once per predictor: no second line
    assert answers == stock
    assert "logits differ" in predictor._runner.fast.not_used["decoding"]
    lines = [r.getMessage() for r in caplog.records if "decoding not used" in r.getMessage()]
    assert len(lines) == 1 and "generate answers" in lines[0]


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(LEAN_FAMILIES)))
def test_off_where_not_written_for(family, tiny_tokenizer):
    predictor = _predictor(build(family, tiny_tokenizer), tiny_tokenizer)
    assert predictor.answer_many(PAIRS[:2])
    assert "decoding" not in predictor._runner.fast.used
    assert "written for" in predictor._runner.fast.not_used["decoding"]


def test_generate_answers_beam_search_and_ngram_bans(tiny_tokenizer, monkeypatch):
    model = _ending_model("t5-v1.0", tiny_tokenizer)
    monkeypatch.setattr(decoding.LeanGreedy, "decode", lambda *a, **k: pytest.fail("the lean loop answered"))
    for settings in ({"num_beams": 3}, {"no_repeat_ngram_size": 2}):
        assert len(_predictor(model, tiny_tokenizer, **settings).answer_many(PAIRS)) == len(PAIRS)


def test_a_generation_config_that_adds_processors_keeps_generate(tiny_tokenizer):
    model = _ending_model("t5-v1.0", tiny_tokenizer)
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in decoding.unsupported(model)
