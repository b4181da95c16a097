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


# ------------------------------------------------------------------------------------------------ the check


def _own_answers_file(model_dir, path):
    """Questions whose reference answer is the PyTorch model's own answer: the model scores F1 100 on them, so an
    export that answers differently loses F1."""
    import dataclasses

    from t5qa.data import write_jsonl

    examples = synthetic_copy_examples(10, seed=31)
    answers = Predictor.from_pretrained(model_dir).answer_many([(ex.context, ex.question) for ex in examples])
    kept = [dataclasses.replace(ex, answers=(a.text,), answer_starts=(-1,)) for ex, a in zip(examples, answers) if a.text]
    assert len(kept) >= 8
    write_jsonl(kept, path)
    return kept


def test_a_faithful_export_passes_its_check_and_predict_shows_it(chatty_dir, tmp_path, capsys):
    from t5qa.cli import main
    from t5qa.export import CHECK_FILE, read_check

    kept = _own_answers_file(chatty_dir, tmp_path / "check.jsonl")
    assert main(["export", "--model", str(chatty_dir), "--output", str(tmp_path / "ct2"),
                 "--check-data", str(tmp_path / "check.jsonl"), "--max-f1-drop", "0.5"]) == 0
    assert "100.0% same answers" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ct2" / CHECK_FILE).read_text())
    assert saved["questions"] == len(kept) and saved["agreement"] == 1.0 and saved["passed"] is True
    assert saved["torch"]["f1"] == saved["export"]["f1"] == 100.0 and saved["delta_f1"] == 0.0
    assert saved["torch"]["questions_per_second"] > 0 and saved["export"]["questions_per_second"] > 0
    assert read_check(tmp_path / "ct2").describe().startswith(f"{len(kept)} questions of ")

    ex = kept[0]
    assert main(["predict", "--model", str(tmp_path / "ct2"), "--backend", "ct2", "--context", ex.context,
                 "--question", ex.question, "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == ex.answers[0]
    assert "export check: " in out.err and "100.0% same answers" in out.err
    assert main(["predict", "--model", str(tmp_path / "ct2"), "--backend", "ct2", "--context", ex.context,
                 "--question", ex.question]) == 0
    assert "export check" not in capsys.readouterr().err


def test_an_export_with_tampered_weights_fails_its_check(chatty_dir, tmp_path, monkeypatch):
    import torch
    from ctranslate2.converters import TransformersConverter

    load = TransformersConverter.load_model

    def tampered(self, *args, **kwargs):  # the weights the converter writes, 30% noise on the decoder's
        model = load(self, *args, **kwargs)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("decoder.") and p.dim() == 2:
                    p.add_(0.3 * p.std() * torch.randn(p.shape, generator=generator))
        return model

    monkeypatch.setattr(TransformersConverter, "load_model", tampered)
    _own_answers_file(chatty_dir, tmp_path / "check.jsonl")
    with pytest.raises(ModelError, match=r"failed its check and was not written: .* F1 100.00 -> "):
        export_ct2(chatty_dir, tmp_path / "ct2", check_data=tmp_path / "check.jsonl", max_f1_drop=1.0)
    assert list(tmp_path.iterdir()) == [tmp_path / "check.jsonl"]  # nothing left behind

    recorded = export_ct2(chatty_dir, tmp_path / "ct2", check_data=tmp_path / "check.jsonl")  # no limit: recorded
    check = json.loads((recorded / "export_check.json").read_text())
    assert check["agreement"] < 0.9 and check["delta_f1"] < -1.0 and check["passed"] is True
    assert check["disagreements"] and check["disagreements"][0]["torch"] != check["disagreements"][0]["export"]


def test_the_check_uses_the_runs_validation_split(tiny_model_dir, tmp_path, caplog):
    from t5qa import api
    from t5qa.export import read_check
    from test_train import make_data

    data = make_data(tmp_path, n_train=30)
    run = api.train(model=str(tiny_model_dir), train=str(data["train"]), output=str(tmp_path / "run"), max_steps=2,
                    train_batch_size=4, max_source_tokens=128, val_fraction=0.2, seed=5)
    out = export_ct2(run.best_dir, tmp_path / "ct2", check_examples=3)
    check = read_check(out)
    assert check is not None and check.questions == 3 and check.data.startswith("the run's validation split of ")
    assert check.agreement == 1.0  # float32 answers as PyTorch does

    with pytest.raises(ConfigError, match="--max-f1-drop needs questions .*names no training run"):
        export_ct2(tiny_model_dir, tmp_path / "other", max_f1_drop=1.0)
    with caplog.at_level("WARNING"):
        export_ct2(tiny_model_dir, tmp_path / "unchecked")
    assert "the export is not checked" in caplog.text and not (tmp_path / "unchecked" / "export_check.json").exists()
