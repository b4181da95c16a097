"""LoRA: only adapter weights train; adapters save, reload and merge into a plain model with identical outputs."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from t5qa.config import EncodeConfig, TrainConfig  # noqa: E402
from t5qa.errors import ConfigError, ModelError  # noqa: E402
from t5qa.lora import apply_lora, is_lora_model, merge_adapter, resolve_target_modules, save_adapter  # noqa: E402
from t5qa.modeling import load_model  # noqa: E402

from conftest import synthetic_copy_examples  # noqa: E402


def _batch(tokenizer, examples):
    prompts = [f"question: {ex.question} context: {ex.context}" for ex in examples]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    labels = tokenizer([ex.answers[0] for ex in examples], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100  # (batch, target_len); padding ignored by the loss
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Base-model weights by their plain name (PEFT renames a wrapped layer's weight to ...base_layer.weight)."""
    if is_lora_model(model):
        state = model.get_base_model().state_dict()
        return {k.replace(".base_layer", ""): v.detach().clone() for k, v in state.items() if "lora_" not in k}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A tiny T5 with rank-4 LoRA trained for 8 optimizer steps, and its base weights from before training."""
    torch.manual_seed(0)
    model, tokenizer = load_model(str(tiny_model_dir))
    before = _base_weights(model)
    lora_model = apply_lora(model, rank=4, alpha=8.0, dropout=0.05)
    batch = _batch(tokenizer, synthetic_copy_examples(8, seed=3))
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=3e-2)
    lora_model.train()
    losses = []
    for _ in range(8):
        loss = lora_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    lora_model.eval()
    return lora_model, tokenizer, before, losses


def test_lora_trains_only_adapter_weights(trained):
    lora_model, _, before, losses = trained
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The default T5 targets are the attention query and value projections, in encoder and decoder.
    assert any(".q.lora_A" in n for n in trainable) and any(".v.lora_B" in n for n in trainable)
    assert not any(".k.lora_" in n or ".o.lora_" in n for n in trainable)
    after = _base_weights(lora_model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"base weight {name} changed"
    # B starts at zero, so a non-zero B proves the adapter itself was trained.
    lora_b = [p for n, p in lora_model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)
    assert losses[-1] < losses[0]


def test_default_targets_follow_the_model_type(tiny_model, tiny_tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration

    t5, _ = tiny_model
    assert resolve_target_modules(t5) == ("q", "v")
    assert resolve_target_modules(t5, ("k", "o")) == ("k", "o")  # a user's choice is kept
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tiny_tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64))
    assert resolve_target_modules(bart) == ("q_proj", "v_proj")
    wrapped = apply_lora(bart, rank=2, alpha=32.0, dropout=0.0)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in names) and any("v_proj.lora_B" in n for n in names)


def test_unknown_target_module_names_the_flag_and_the_existing_layers(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ConfigError, match=r"--lora-target-modules: no linear layer named 'query'.*\bq\b.*\bv\b"):
        apply_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=("query",))


def test_apply_lora_needs_a_rank(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ConfigError, match="--lora-rank"):
        apply_lora(model, rank=None, alpha=8.0, dropout=0.0)


def _inputs(tokenizer):
    examples = synthetic_copy_examples(4, seed=11)
    return tokenizer([f"question: {ex.question} context: {ex.context}" for ex in examples],
                     padding=True, return_tensors="pt")


def _logits(model, enc):
    decoder_input_ids = torch.zeros((enc.input_ids.shape[0], 3), dtype=torch.long)  # (batch, 3) pad = start
    with torch.no_grad():
        return model(**enc, decoder_input_ids=decoder_input_ids).logits  # (batch, 3, vocab)


def _generate(model, enc):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=6, num_beams=1, do_sample=False)


def test_adapter_saves_reloads_and_merges_to_the_same_model(trained, tiny_model_dir, tmp_path):
    lora_model, tokenizer, _, _ = trained
    enc = _inputs(tokenizer)
    adapter_dir = tmp_path / "best"
    save_adapter(lora_model, tokenizer, adapter_dir, {"prompt_template": "question: {question} context: {context}"})

    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "t5qa.json"} <= names
    assert "model.safetensors" not in names  # the base weights are not copied
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    meta = json.loads((adapter_dir / "t5qa.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["target_modules"] == ["q", "v"]
    assert meta["prompt_template"].startswith("question:")

    reloaded, _ = load_model(str(adapter_dir))
    assert is_lora_model(reloaded)
    torch.testing.assert_close(_logits(reloaded, enc), _logits(lora_model, enc))

    merged_dir = merge_adapter(adapter_dir, tmp_path / "merged")
    merged_names = {p.name for p in merged_dir.iterdir()}
    assert "model.safetensors" in merged_names and "adapter_config.json" not in merged_names
    merged, _ = load_model(str(merged_dir))
    assert not is_lora_model(merged)
    merged_meta = json.loads((merged_dir / "t5qa.json").read_text())
    assert merged_meta["merged_from_adapter"] == str(adapter_dir.resolve())
    assert "lora" not in merged_meta and merged_meta["merged_lora"]["rank"] == 4

    torch.testing.assert_close(_logits(merged, enc), _logits(reloaded, enc), atol=1e-5, rtol=1e-4)
    assert torch.equal(_generate(merged, enc), _generate(reloaded, enc))
    # The adapter must matter, or the equalities above would prove nothing.
    base, _ = load_model(str(tiny_model_dir))
    assert not torch.allclose(_logits(base, enc), _logits(merged, enc), atol=1e-3)


def _lora_parser() -> argparse.ArgumentParser:
    from t5qa.cli import lora_cmd

    parser = argparse.ArgumentParser(prog="t5qa")
    lora_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_merge_writes_a_plain_model(trained, tmp_path, capsys):
    lora_model, tokenizer, _, _ = trained
    save_adapter(lora_model, tokenizer, tmp_path / "adapter", {})
    args = _lora_parser().parse_args(["lora", "merge", "--adapter", str(tmp_path / "adapter"),
                                      "--output", str(tmp_path / "merged")])
    assert args.func(args) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "merged" in capsys.readouterr().out


def test_merge_refuses_a_directory_without_an_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="no adapter_config.json.*--adapter"):
        merge_adapter(tiny_model_dir, tmp_path / "out")


@pytest.mark.slow
def test_fit_with_lora_rank_saves_adapters_that_merge(tiny_model_dir, tmp_path):
    import hashlib

    from t5qa.data import write_jsonl
    from t5qa.train import fit

    from conftest import synthetic_copy_examples

    write_jsonl(synthetic_copy_examples(16, seed=0), tmp_path / "train.jsonl")
    write_jsonl(synthetic_copy_examples(4, seed=1), tmp_path / "validation.jsonl")
    weights = tiny_model_dir / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(tmp_path / "train.jsonl"),
                      validation=str(tmp_path / "validation.jsonl"), output=str(tmp_path / "run"), max_steps=4,
                      eval_every_steps=2, train_batch_size=4, learning_rate=3e-2, lora_rank=4,
                      encode=EncodeConfig(max_source_tokens=96, stride_tokens=32))
    result = fit(cfg)
    for directory in (result.best_dir, result.last_dir):
        names = {p.name for p in directory.iterdir()}
        assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # the base model on disk is untouched

    adapter, tokenizer = load_model(str(result.last_dir))
    merged_dir = merge_adapter(result.last_dir, tmp_path / "merged")
    merged, _ = load_model(str(merged_dir))
    base, _ = load_model(str(tiny_model_dir))
    enc = _inputs(tokenizer)
    torch.testing.assert_close(_logits(merged, enc), _logits(adapter, enc), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(base, enc), _logits(merged, enc), atol=1e-3)


def test_train_merge_writes_a_plain_model_that_answers_like_the_adapter(tiny_model_dir, tmp_path, capsys):
    from t5qa.cli import main
    from t5qa.data import write_jsonl
    from t5qa.modeling import read_meta

    write_jsonl(synthetic_copy_examples(16, seed=0), tmp_path / "train.jsonl")
    argv = ["train", "--model", str(tiny_model_dir), "--train", str(tmp_path / "train.jsonl"), "--val-fraction",
            "0", "--output", str(tmp_path / "run"), "--max-steps", "3", "--train-batch-size", "4",
            "--learning-rate", "3e-2", "--lora-rank", "4", "--no-progress"]
    assert main([*argv, "--merge"]) == 0
    merged = tmp_path / "run" / "best-merged"
    assert f"merged model: {merged}" in capsys.readouterr().out
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    plain, tokenizer = load_model(str(merged))
    adapter, _ = load_model(str(tmp_path / "run" / "best"))
    assert not is_lora_model(plain) and is_lora_model(adapter)
    enc = _inputs(tokenizer)
    torch.testing.assert_close(_logits(plain, enc), _logits(adapter, enc), rtol=1e-4, atol=1e-5)
    assert read_meta(merged)["encode"] == read_meta(tmp_path / "run" / "best")["encode"]  # it predicts the same way
    assert main([*argv[:-3], "--no-progress", "--merge"]) == 2  # without --lora-rank: nothing to merge, one clear line
    assert "--merge needs --lora-rank" in capsys.readouterr().err


def test_a_model_type_without_a_known_default_must_name_its_targets(tiny_model):
    model, _ = tiny_model
    model.config.model_type = "my-own-seq2seq"
    with pytest.raises(ConfigError, match="knows no default.*linear layers: .*\\bq\\b"):
        resolve_target_modules(model)
    assert resolve_target_modules(model, ("q", "k")) == ("q", "k")
