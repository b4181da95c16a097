"""Tiny randomly initialised models of every family the README names, built offline from their configs.

Each builder returns (model, tokenizer); shapes are tiny (two layers, width 32-64) so a family goes through
train, evaluate, predict, serve and export in seconds. ByT5 uses its own byte tokenizer; the others share the
locally trained tiny SentencePiece-style tokenizer (pad 0, </s> 1, <unk> 2).
"""

from __future__ import annotations

from typing import Any, Callable

_T5_SHAPE = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                 relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.1)


def _ids(tokenizer: Any) -> dict[str, int]:
    return dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id)


def t5_v10(tokenizer: Any) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), feed_forward_proj="relu",
                                               tie_word_embeddings=True, **_T5_SHAPE, **_ids(tokenizer)))


def t5_v11(tokenizer: Any) -> Any:
    """T5 v1.1 / Flan-T5: gated GELU, untied output layer (transformers 5: unscaled decoder outputs)."""
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
                                               tie_word_embeddings=False, **_T5_SHAPE, **_ids(tokenizer)))


def mt5(tokenizer: Any) -> Any:
    from transformers import MT5Config, MT5ForConditionalGeneration

    return MT5ForConditionalGeneration(MT5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
                                                 tie_word_embeddings=False, **_T5_SHAPE, **_ids(tokenizer)))


def umt5(tokenizer: Any) -> Any:
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    return UMT5ForConditionalGeneration(UMT5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
                                                   tie_word_embeddings=False, **_T5_SHAPE, **_ids(tokenizer)))


def byt5(tokenizer: Any) -> Any:
    """ByT5: the T5 v1.1 architecture over bytes (its tokenizer is passed in)."""
    return t5_v11(tokenizer)


def _longt5(tokenizer: Any, attention: str) -> Any:
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    return LongT5ForConditionalGeneration(LongT5Config(
        vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        encoder_attention_type=attention, local_radius=8, global_block_size=4, **_T5_SHAPE, **_ids(tokenizer)))


def longt5_local(tokenizer: Any) -> Any:
    return _longt5(tokenizer, "local")


def longt5_tglobal(tokenizer: Any) -> Any:
    return _longt5(tokenizer, "transient-global")


def bart(tokenizer: Any) -> Any:
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=1024,
        dropout=0.1, attention_dropout=0.1, bos_token_id=tokenizer.pad_token_id, forced_eos_token_id=None,
        **_ids(tokenizer)))


def t5gemma(tokenizer: Any) -> Any:
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

    def module() -> Any:
        return T5GemmaModuleConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=16, sliding_window=16, attention_dropout=0.1,
                                   max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.pad_token_id)

    config = T5GemmaConfig(encoder=module(), decoder=module(), vocab_size=len(tokenizer), dropout_rate=0.1,
                           attention_dropout=0.1)
    config.decoder_start_token_id = tokenizer.pad_token_id
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return T5GemmaForConditionalGeneration(config)


FAMILIES: dict[str, Callable[[Any], Any]] = {
    "t5-v1.0": t5_v10, "t5-v1.1": t5_v11, "mt5": mt5, "umt5": umt5, "byt5": byt5,
    "longt5-local": longt5_local, "longt5-tglobal": longt5_tglobal, "bart": bart, "t5gemma": t5gemma,
}
# CTranslate2 4.x converts and loads these (with transformers 5). LongT5 it does not know, BART's converter fails
# on a config field transformers 5 renamed, and T5Gemma converts but does not load: `t5qa export` refuses those.
CT2_FAMILIES = {"t5-v1.0", "t5-v1.1", "mt5", "umt5", "byt5"}


def build(family: str, tokenizer: Any, seed: int = 0) -> Any:
    """A tiny model of `family` whose untrained answers are varied, non-empty text."""
    import torch

    from t5qa.modeling import ensure_generation_ids

    torch.manual_seed(seed)
    model = FAMILIES[family](tokenizer)
    ensure_generation_ids(model, tokenizer)
    return model


def byte_tokenizer() -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()
