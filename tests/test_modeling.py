"""Loading, creating and saving models safely."""

from __future__ import annotations

import json

import pytest
import torch

from t5qa.errors import ConfigError, ModelError
from t5qa.modeling import (
    check_precision,
    count_parameters,
    freeze,
    init_model,
    load_model,
    read_meta,
    save_model,
)


def test_saved_model_loads_with_transformers_alone(tiny_model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "t5qa.json"} <= names
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id
    assert read_meta(tiny_model_dir)["max_source_tokens"] == 128


def test_pickled_weights_are_refused_unless_allowed(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path, safe_serialization=False)
    tokenizer.save_pretrained(tmp_path)
    if (tmp_path / "model.safetensors").exists():  # transformers may ignore safe_serialization=False
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled.*--allow-pickle"):
        load_model(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), allow_pickle=True)
    assert count_parameters(loaded) == count_parameters(model)


def test_hub_name_offline_gives_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        load_model("t5-small")
    message = str(info.value)
    assert "Hub is unreachable" in message and "init-model" in message and "\n" not in message


def test_missing_local_directory_is_named():
    with pytest.raises(ModelError, match="no such"):
        load_model("./does/not/exist")


def test_fp16_is_refused_for_t5_with_the_reason(tiny_model):
    with pytest.raises(ConfigError, match="overflow"):
        check_precision(tiny_model[0], "fp16")
    check_precision(tiny_model[0], "bf16")  # allowed


def test_freeze_parts(tiny_model):
    model, _ = tiny_model
    total = count_parameters(model, trainable_only=True)
    frozen = freeze(model, embeddings=True)
    assert frozen == model.get_input_embeddings().weight.numel()
    assert not model.get_input_embeddings().weight.requires_grad
    assert count_parameters(model, trainable_only=True) == total - frozen
    freeze(model, first_layers=1)
    assert not any(p.requires_grad for p in model.encoder.block[0].parameters())
    assert all(p.requires_grad for p in model.encoder.block[1].parameters())
    freeze(model, encoder=True)
    assert not any(p.requires_grad for p in model.get_encoder().parameters())
    assert any(p.requires_grad for p in model.decoder.block[1].parameters())


def test_init_model_trains_a_tokenizer_on_a_data_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"context": f"the code is kilo {i} and the city is oslo", "question": "what is the code?",
             "answer": "kilo"} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = init_model("tiny", str(data), tmp_path / "model", vocab_size=120)
    model, tokenizer = load_model(str(out))
    assert model.config.vocab_size == len(tokenizer) <= 120
    assert model.config.d_model == 64
    ids = tokenizer("question: what is the code? context: the city is oslo")["input_ids"]
    assert tokenizer.unk_token_id not in ids


def test_init_model_reads_a_data_file_with_its_own_columns(tmp_path, capsys):
    from t5qa.cli import main

    data = tmp_path / "reviews.csv"
    data.write_text("review,query,span\n" + "".join(f"the soup was zesty {i},how was the soup?,zesty\n"
                                                     for i in range(20)), encoding="utf-8")
    assert main(["init-model", "--config", "tiny", "--tokenizer", str(data), "--output", str(tmp_path / "none"),
                 "--vocab-size", "120"]) != 0
    assert "--context-column" in capsys.readouterr().err  # the fix the error names is a flag init-model takes
    assert main(["init-model", "--config", "tiny", "--tokenizer", str(data), "--vocab-size", "120",
                 "--context-column", "review", "--question-column", "query", "--answer-column", "span",
                 "--output", str(tmp_path / "model")]) == 0
    _, tokenizer = load_model(str(tmp_path / "model"))
    assert tokenizer.unk_token_id not in tokenizer("question: how was the soup? context: zesty")["input_ids"]


def test_init_model_unknown_preset_names_the_choices(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="tiny"):
        init_model("huge", str(tiny_model_dir), tmp_path / "m")


def test_save_model_replaces_atomically(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    target = tmp_path / "best"
    save_model(model, tokenizer, target, {"step": 1})
    save_model(model, tokenizer, target, {"step": 2})
    assert read_meta(target) == {"step": 2}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "best"]
    assert leftovers == []


def test_unreachable_hub_is_detected_up_front_without_retries(monkeypatch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import t5qa.modeling as modeling

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(modeling, "hub_reachable", lambda timeout_s=3.0: False)
    tried = []  # from_pretrained's own retries take about a minute: it may only look in the local cache

    def cache_only(*args, **kwargs):
        tried.append(kwargs.get("local_files_only"))
        raise OSError("not in the local cache")

    for cls in (AutoModelForSeq2SeqLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", cache_only)
    with pytest.raises(ModelError, match="Hub is unreachable"):
        load_model("google/flan-t5-small")
    assert tried and all(tried)


def test_hub_reachable_honours_offline_mode(monkeypatch):
    import t5qa.modeling as modeling

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    modeling.hub_reachable.cache_clear()
    try:
        assert modeling.hub_reachable() is False
    finally:
        modeling.hub_reachable.cache_clear()


def test_init_model_on_chinese_data_has_no_unk_and_falls_back_to_bytes(tmp_path):
    from transformers import AutoTokenizer

    from t5qa.data import load_examples, sample_data_path

    out = init_model("tiny", str(sample_data_path("zh")), tmp_path / "zh", vocab_size=2000)
    tokenizer = AutoTokenizer.from_pretrained(out)  # as saved: byte fallback survives the reload
    assert len(tokenizer) <= 2000
    texts = [t for ex in load_examples(sample_data_path("zh")) for t in (ex.context, ex.question, *ex.answers)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}  # every character of the data covered
    assert "？" in tokenizer.tokenize("什么？")  # full-width punctuation kept as itself, not NFKC-folded
    unseen = "龘靐 ok"  # characters the data never shows
    pieces = tokenizer.tokenize(unseen)
    assert "<0xE9>" in pieces and tokenizer.unk_token not in pieces
    assert tokenizer.decode(tokenizer(unseen)["input_ids"], skip_special_tokens=True) == unseen


def test_init_model_with_the_byte_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = init_model("byte-mini", "bytes", tmp_path / "bytes")
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "ByT5Tokenizer"
    config = AutoConfig.from_pretrained(out)
    # T5 v1.1's untied head: transformers 5 records it as unscaled decoder outputs
    assert config.vocab_size == 384 and not config.scale_decoder_outputs and config.num_decoder_layers == 1
