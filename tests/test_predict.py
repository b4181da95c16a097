"""Predictor: single and batched answers, answer length, long-context windows, scores."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import synthetic_copy_examples
from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.errors import ConfigError, DataError, ModelError
from t5qa.fastpath import decoding
from t5qa.predict import Answer, Predictor, _Item, default_max_new_tokens


@pytest.fixture(scope="module")
def chatty_dir(chatty_model_dir):
    return chatty_model_dir


@pytest.fixture(scope="module")
def predictor(chatty_dir):
    return Predictor.from_pretrained(chatty_dir, generate=GenerateConfig(batch_size=4, max_new_tokens=6))


@pytest.fixture(scope="module")
def pairs():
    # Different filler lengths give sources of different lengths, so sorting really reorders them.
    examples = synthetic_copy_examples(5, seed=3) + synthetic_copy_examples(4, seed=4, filler_words=8)
    return [(ex.context, ex.question) for ex in examples]


def test_answer_equals_plain_generate(predictor, pairs):
    context, question = pairs[0]
    answer = predictor.answer(context, question)
    ids = predictor.tokenizer(f"question: {question} context: {context}", return_tensors="pt").input_ids
    with torch.no_grad():
        out = predictor.model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=1)
    expected = predictor.tokenizer.decode(out[0], skip_special_tokens=True).strip()
    assert isinstance(answer, Answer)
    assert answer.text == expected and answer.text
    assert (answer.window_index, answer.num_windows) == (0, 1)
    assert answer.score < 0
    assert answer.seconds is not None and answer.seconds > 0


def test_score_is_mean_log_prob_per_token(predictor, pairs):
    context, question = pairs[1]
    answer = predictor.answer(context, question)
    tok = predictor.tokenizer
    source = tok(f"question: {question} context: {context}", return_tensors="pt")
    out = predictor.model.generate(**source, max_new_tokens=6, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
    # No logits processor is active, so the processed scores are the raw logits.
    steps = predictor.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    generated = out.sequences[0, 1:]
    n = int((generated == tok.eos_token_id).nonzero()[0]) + 1 if (generated == tok.eos_token_id).any() else len(generated)
    assert answer.score == pytest.approx(float(steps[:n].mean()), abs=1e-5)


def test_batch_keeps_input_order_and_equals_one_at_a_time(predictor, pairs):
    batched = predictor.answer_many(pairs)
    single = [predictor.answer(c, q) for c, q in pairs]
    assert [a.text for a in batched] == [a.text for a in single]
    # Scores differ between inputs, so comparing them position by position really checks the order.
    assert len({round(a.score, 3) for a in batched}) >= len(pairs) - 1
    for b, s in zip(batched, single):
        assert b.score == pytest.approx(s.score, abs=1e-4)


def test_batches_are_sorted_by_length(predictor, pairs):
    """Sorting puts similar lengths together: less padding than batching in input order."""
    sorted_pred = Predictor(predictor.model, predictor.tokenizer, predictor.encode_config,
                            GenerateConfig(batch_size=3, max_new_tokens=2))
    sorted_pred.answer_many(pairs)
    lengths = [len(predictor.tokenizer(f"question: {q} context: {c}").input_ids) for c, q in pairs]
    unsorted_padded = sum(max(lengths[i:i + 3]) * len(lengths[i:i + 3]) for i in range(0, len(lengths), 3))
    assert sorted_pred.stats.real_tokens == sum(lengths)
    assert sorted_pred.stats.padded_tokens < unsorted_padded
    assert sorted_pred.stats.questions == len(pairs) and sorted_pred.stats.batches == 3


def test_generate_overrides_apply_per_call(predictor, pairs):
    context, question = pairs[2]
    short = predictor.answer(context, question, max_new_tokens=1)
    longer = predictor.answer(context, question)
    assert len(short.text) < len(longer.text)
    with pytest.raises(ConfigError, match="num_beam"):
        predictor.answer(context, question, num_beam=2)
    with pytest.raises(ConfigError, match="--num-beams"):
        predictor.answer(context, question, num_beams=0)


def test_beam_search_answers_equal_plain_generate(predictor, pairs):
    answers = predictor.answer_many(pairs[:3], num_beams=3, no_repeat_ngram_size=2, length_penalty=1.0)
    tok = predictor.tokenizer
    for (context, question), answer in zip(pairs[:3], answers):
        ids = tok(f"question: {question} context: {context}", return_tensors="pt").input_ids
        with torch.no_grad():
            out = predictor.model.generate(ids, max_new_tokens=6, num_beams=3, no_repeat_ngram_size=2,
                                           do_sample=False)
        bigrams = list(zip(out[0].tolist(), out[0].tolist()[1:]))
        assert len(bigrams) == len(set(bigrams))
        assert answer.text == tok.decode(out[0], skip_special_tokens=True).strip() and answer.text
        assert answer.score < 0


def test_default_answer_length_comes_from_the_model(tiny_model_dir, caplog, monkeypatch):
    predictor = Predictor.from_pretrained(tiny_model_dir)
    assert predictor.max_new_tokens() == 4  # answer_tokens_p99 in the fixture's t5qa.json
    seen = {}
    original = predictor.model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(predictor.model, "generate", spy)
    lean = decoding.LeanGreedy.decode
    monkeypatch.setattr(decoding.LeanGreedy, "decode", lambda self, *a, **k: seen.update(k) or lean(self, *a, **k))
    predictor.answer("the code is kilo .", "what is the code?")
    assert seen["max_new_tokens"] == 4
    seen.clear()
    predictor.answer("the code is kilo .", "what is the code?", num_beams=2)  # beam search: generate
    assert seen["max_new_tokens"] == 4 and seen["num_beams"] == 2
    assert default_max_new_tokens({"max_target_tokens": 24}) == 24
    with caplog.at_level(logging.INFO, logger="t5qa.predict"):
        assert default_max_new_tokens({}) == 32
    assert "--max-new-tokens" in caplog.text


def test_stride_and_template_come_from_the_model(tiny_model_dir):
    predictor = Predictor.from_pretrained(tiny_model_dir, stride_tokens=5)
    assert predictor.encode_config.max_source_tokens == 128 and predictor.encode_config.stride_tokens == 5
    assert predictor.encode_config.prompt_template == "question: {question} context: {context}"


def _long_context(n_facts: int = 4) -> str:
    examples = synthetic_copy_examples(n_facts, seed=7, filler_words=10)
    return " ".join(ex.context for ex in examples)


def test_long_context_is_answered_in_windows(predictor):
    small = Predictor(predictor.model, predictor.tokenizer,
                      EncodeConfig(max_source_tokens=48, stride_tokens=8), GenerateConfig(max_new_tokens=3))
    context = _long_context()
    answer = small.answer(context, "what is the code?")
    assert answer.num_windows > 1
    assert 0 <= answer.window_index < answer.num_windows
    assert 0 <= answer.window_char_start < answer.window_char_end <= len(context)
    short = small.answer("the code is kilo .", "what is the code?")
    assert short.num_windows == 1
    assert small.stats.windows == answer.num_windows + 1


def test_best_window_wins_and_empty_loses(predictor, monkeypatch):
    small = Predictor(predictor.model, predictor.tokenizer,
                      EncodeConfig(max_source_tokens=48, stride_tokens=8), GenerateConfig(max_new_tokens=3))
    context = _long_context()
    plans = {}

    def fake_run(batch: list[_Item], gen: GenerateConfig, max_new_tokens: int, stats):
        return [plans[item.window.window_index] for item in batch]

    monkeypatch.setattr(small._runner, "run", fake_run)
    n = len(small._encode([(context, "q?")]))
    assert n >= 3
    # The most confident window says "" (no answer here): a non-empty answer must win.
    plans.update({k: (f"answer {k}", -2.0 - k) for k in range(n)})
    plans[0] = ("", -0.01)
    plans[2] = ("answer 2", -0.5)
    best = small.answer(context, "q?")
    assert (best.text, best.window_index, best.num_windows, best.score) == ("answer 2", 2, n, -0.5)
    # Every window empty: the answer is empty, from the most confident window.
    plans.update({k: ("", -1.0 - k) for k in range(n)})
    plans[1] = ("", -0.2)
    best = small.answer(context, "q?")
    assert (best.text, best.window_index) == ("", 1)


def test_bad_inputs_raise_t5qa_errors(predictor, tmp_path):
    with pytest.raises(DataError, match="pair 1"):
        predictor.answer_many([("context", "question"), ("only one",)])
    with pytest.raises(ModelError, match="no model weights"):
        Predictor.from_pretrained(tmp_path)
    with pytest.raises(ModelError, match="t5qa export"):
        Predictor.from_pretrained(tmp_path, backend="ct2")
    with pytest.raises(ConfigError, match="--backend"):
        Predictor.from_pretrained(tmp_path, backend="onnx")


def test_model_mode_is_restored(predictor, pairs):
    predictor.model.train()
    try:
        predictor.answer(*pairs[0])
        assert predictor.model.training
    finally:
        predictor.model.eval()


def test_a_shorter_input_brings_its_own_window_overlap(tiny_model_dir):
    # The saved overlap (32 at 128 tokens) would not fit 40 tokens: like training, the overlap follows the input
    # length (a quarter of it) unless it is given too.
    assert Predictor.from_pretrained(tiny_model_dir, max_source_tokens=40).encode_config.stride_tokens == 10
    both = Predictor.from_pretrained(tiny_model_dir, max_source_tokens=40, stride_tokens=3)
    assert both.encode_config.stride_tokens == 3
    assert Predictor.from_pretrained(tiny_model_dir).encode_config.stride_tokens == 32
