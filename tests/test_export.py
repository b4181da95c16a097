"""CTranslate2 export and backend: float32 answers equal PyTorch's; int8 loads and answers."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_copy_examples
from t5qa.config import GenerateConfig
from t5qa.errors import ConfigError, ModelError
from t5qa.predict import Predictor

pytest.importorskip("ctranslate2", reason="the ct2 extra (ctranslate2) is not installed")

from t5qa.export import export_ct2  # noqa: E402


@pytest.fixture(scope="module")
def chatty_dir(chatty_model_dir):
    return chatty_model_dir


@pytest.fixture(scope="module")
def ct2_dir(chatty_dir, tmp_path_factory):
    return export_ct2(chatty_dir, tmp_path_factory.mktemp("ct2") / "f32", quantization="float32")


@pytest.fixture(scope="module")
def pairs():
    examples = synthetic_copy_examples(5, seed=21) + synthetic_copy_examples(3, seed=22, filler_words=8)
    return [(ex.context, ex.question) for ex in examples]


def test_export_layout(ct2_dir, chatty_dir):
    names = {p.name for p in ct2_dir.iterdir()}
    assert {"model.bin", "config.json", "t5qa.json"} <= names
    assert "tokenizer.json" in names or "spiece.model" in names
    meta = json.loads((ct2_dir / "t5qa.json").read_text())
    assert meta["ct2"]["quantization"] == "float32"
    assert meta["answer_tokens_p99"] == json.loads((chatty_dir / "t5qa.json").read_text())["answer_tokens_p99"]
    assert not [p for p in ct2_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=6),
    dict(max_new_tokens=5, min_new_tokens=3, no_repeat_ngram_size=2),
    dict(max_new_tokens=5, num_beams=3),
])
def test_float32_answers_equal_torch(ct2_dir, chatty_dir, pairs, settings):
    generate = GenerateConfig(batch_size=3, **settings)
    torch_answers = Predictor.from_pretrained(chatty_dir, generate=generate).answer_many(pairs)
    ct2 = Predictor.from_pretrained(ct2_dir, backend="ct2", generate=generate)
    ct2_answers = ct2.answer_many(pairs)
    assert ct2.backend == "ct2" and ct2.model is None
    assert [a.text for a in ct2_answers] == [a.text for a in torch_answers]
    assert sum(bool(a.text) for a in ct2_answers) >= len(pairs) - 1
    if "min_new_tokens" not in settings:
        # With constraints, CTranslate2 scores the constrained distribution and PyTorch the model's own, so
        # only unconstrained decoding has equal scores.
        for c, t in zip(ct2_answers, torch_answers):
            assert c.score == pytest.approx(t.score, abs=1e-3)


def test_default_answer_length_and_windows_with_ct2(ct2_dir, chatty_dir):
    ct2 = Predictor.from_pretrained(ct2_dir, backend="ct2", max_source_tokens=48, stride_tokens=8)
    assert ct2.max_new_tokens() == 4  # answer_tokens_p99 travelled with the export
    context = " ".join(ex.context for ex in synthetic_copy_examples(3, seed=5))
    answer = ct2.answer(context, "what is the code?")
    pt = Predictor.from_pretrained(chatty_dir, max_source_tokens=48, stride_tokens=8)
    expected = pt.answer(context, "what is the code?")
    assert answer.num_windows == expected.num_windows > 1
    assert (answer.text, answer.window_index) == (expected.text, expected.window_index)


def test_int8_export_loads_and_answers(chatty_dir, tmp_path, pairs):
    out = export_ct2(chatty_dir, tmp_path / "int8", quantization="int8")
    assert json.loads((out / "t5qa.json").read_text())["ct2"]["quantization"] == "int8"
    f32_size = (export_ct2(chatty_dir, tmp_path / "f32", quantization="float32") / "model.bin").stat().st_size
    assert (out / "model.bin").stat().st_size < f32_size
    answers = Predictor.from_pretrained(out, backend="ct2").answer_many(pairs)
    assert len(answers) == len(pairs)
    assert all(isinstance(a.text, str) and a.score <= 0 for a in answers)
    assert sum(bool(a.text) for a in answers) >= len(pairs) // 2


def test_export_errors(chatty_dir, ct2_dir, tmp_path):
    with pytest.raises(ConfigError, match="--quantization"):
        export_ct2(chatty_dir, tmp_path / "x", quantization="int3")
    with pytest.raises(ConfigError, match="already exists"):
        export_ct2(chatty_dir, ct2_dir)
    with pytest.raises(ModelError, match="no such model directory"):
        export_ct2(tmp_path / "missing", tmp_path / "y")
    with pytest.raises(ModelError, match="--backend ct2"):
        Predictor.from_pretrained(ct2_dir)  # a CTranslate2 export needs the ct2 backend
    with pytest.raises(ModelError, match="t5qa export"):
        Predictor.from_pretrained(chatty_dir, backend="ct2")
