"""FLOPs of a T5-style encoder-decoder, counted from its shapes and the real (non-padding) token counts.

One multiply-add is 2 FLOPs. Counted: every matmul (attention projections, attention scores and
weighted sums, feed-forward, the LM head). Not counted: embeddings lookups, layer norms, softmax,
activations, dropout, the relative position bias (all O(tokens x d_model), under 1% here).
Training is 3 x forward (the backward pass costs twice the forward: gradients w.r.t. inputs and weights).

For a real-token count, padding is useful work for nobody, so a tool that pads to 384 gets no credit for it.
"""

from __future__ import annotations

from typing import Any


def _shape(config: Any) -> tuple[int, int, int, int, int, int, bool]:
    inner = config.num_heads * config.d_kv  # width of q, k, v
    gated = bool(getattr(config, "is_gated_act", False))
    decoder_layers = getattr(config, "num_decoder_layers", None) or config.num_layers
    return config.d_model, config.d_ff, inner, config.num_layers, decoder_layers, config.vocab_size, gated


def forward_flops(config: Any, source_tokens: int, target_tokens: int) -> int:
    """FLOPs of one forward pass of one example (teacher forcing: all target tokens at once).

    Args:
        config: a transformers T5Config (or any object with its fields).
        source_tokens: real encoder input tokens of the example.
        target_tokens: real decoder tokens (the labels) of the example.
    Returns:
        FLOPs (2 per multiply-add).
    """
    d, d_ff, inner, enc_layers, dec_layers, vocab, gated = _shape(config)
    s, t = source_tokens, target_tokens
    ffn = (3 if gated else 2) * d * d_ff  # multiply-adds per token: wi (x2 when gated), wo

    # Encoder layer: q, k, v, o projections and the FFN per token; QK^T and AV over s x s.
    encoder = enc_layers * (s * (4 * d * inner + ffn) + 2 * s * s * inner)
    # Decoder layer: self-attention as above over t x t; cross-attention q, o on the t decoder tokens and
    # k, v on the s encoder outputs, scores and weighted sum over t x s; the FFN per token.
    decoder = dec_layers * (
        t * (4 * d * inner + ffn)
        + 2 * t * t * inner
        + t * 2 * d * inner + s * 2 * d * inner
        + 2 * t * s * inner
    )
    lm_head = t * d * vocab
    return 2 * (encoder + decoder + lm_head)


def train_flops(config: Any, source_tokens: int, target_tokens: int) -> int:
    """FLOPs of one training example: forward + backward = 3 x forward."""
    return 3 * forward_flops(config, source_tokens, target_tokens)


def generate_flops(config: Any, source_tokens: int, new_tokens: int) -> int:
    """FLOPs of greedy generation with a KV cache: one encoder pass, then one decoder token per step.

    Step i (1-based) attends over i cached decoder positions and the s encoder positions; cross-attention
    keys and values of the encoder outputs are computed once.
    """
    d, d_ff, inner, enc_layers, dec_layers, vocab, gated = _shape(config)
    s = source_tokens
    ffn = (3 if gated else 2) * d * d_ff
    encoder = enc_layers * (s * (4 * d * inner + ffn) + 2 * s * s * inner)
    cross_kv = dec_layers * s * 2 * d * inner
    per_step = 0
    for i in range(1, new_tokens + 1):
        per_step += dec_layers * (4 * d * inner + ffn + 2 * i * inner + 2 * d * inner + 2 * s * inner) + d * vocab
    return 2 * (encoder + cross_kv + per_step)
