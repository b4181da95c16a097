"""A lean greedy decoding loop for the T5 family: what `predict.TorchBackend` answers with in place of
transformers' `generate` where it has proven itself (issue 18).

Why by hand: `generate` runs every step through the model's full forward, which grows the self-attention cache by
concatenation (a copy of the whole cache at every step and layer), builds the causal and padding masks and the
position bias again at every step, and keeps finished rows in the batch until the longest answer ends. No
library offers a greedy loop over an encoder-decoder's own weights without those costs (transformers' static
cache removes the concatenation only, and its continuous batching serves decoder-only models). This loop:

- runs the encoder once per batch over its own modules and weights, with the position bias and the padding mask
  summed once for all its layers (the stock encoder sums and copies them again in every layer's attention, a
  tenth of its time at 32 x 170 tokens) and each layer's query, key and value products fused into one;
- where a batch mixes short and long inputs (a server's batch of whatever requests came in), encodes it in
  chunks of rows of similar length, each padded only to its own longest row, and pads the cross-attention keys
  and values instead (the encoder's work then follows the real tokens, not the batch's longest input);
- computes every decoder layer's cross-attention keys and values in one product over the encoder's output;
- keeps the self-attention keys and values in a cache allocated once, written in place;
- computes the decoder's relative position bias once per batch, for every step;
- fuses each layer's query, key and value products into one;
- runs T5 v1.0's feed-forward layers' first product and its ReLU as one oneDNN call;
- lets finished rows leave the batch (their caches are compacted once a quarter of the batch has finished), so a
  batch of short answers stops paying for the rows that are done.

It implements exactly what `generate` does for greedy search with t5qa's settings: the decoder start token, argmax
over the logits with `</s>` forbidden before `min_new_tokens`, an optional prefix constraint (grounding.py), and
stop at `</s>` or `max_new_tokens`. Anything else that `generate` would apply (the model's generation config
asking for repetition penalties, forced or suppressed tokens and the like; beam search; no-repeat n-grams) is
left to `generate`.

Written for: `T5ForConditionalGeneration` and `MT5ForConditionalGeneration` (t5, flan-t5, t5 v1.1, mT5, ByT5)
with fp32 weights on the CPU, no gradients. It proves itself once per Predictor on its model and first batch
(`prove`): its logits for the batch's longest and shortest inputs over PROOF_STEPS steps, with the encoder run in
one pass and in chunks, must equal the stock forward pass's, given the same decoder tokens, within LOGITS_RTOL of
their largest magnitude. Where it does not, or cannot be tried, one line says why and `generate` answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn import functional as F

from t5qa.fastpath import linear

logger = logging.getLogger(__name__)

WRITTEN_FOR = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
LOGITS_RTOL = 1e-4
PROOF_ROWS = 2
PROOF_STEPS = 4
TOLERANCE = f"logits within {LOGITS_RTOL:g} of their largest magnitude"
# Finished rows leave the batch once they are this share of it (compaction copies every cache).
COMPACT_SHARE = 0.25
# The encoder runs in chunks of this many rows (longest first) where that leaves out at least CHUNK_SAVING of the
# batch's padded tokens: a server's batch of requests in any order of length (8.45 against 6.59 requests/s), and
# Predictor.answer_many's length-sorted batches of 64 (+5-7% against one-pass batches of 32), whose decoder steps
# cost less per question than at 32 (bench/ANSWERING_RESULTS.md). 8 rows x 100+ tokens keep the encoder's products
# large enough to run near the machine's matmul rate.
CHUNK_ROWS = 8
CHUNK_SAVING = 0.05
# Generation-config fields that make `generate` add a logits processor or change stopping, with their neutral
# values: where a model's config sets another, this loop is not used. (t5qa passes the beams, lengths, length
# penalty and no-repeat n-gram size to `generate` itself, so the model's values of those do not count.)
_NEUTRAL_GENERATION = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "watermarking_config": (None,),
    "stop_strings": (None,), "max_time": (None,),
}

Allowed = Callable[[int, list[int]], list[int]]
"""(row of the batch, answer tokens so far) -> the tokens that may come next (grounding.SpanConstraint.allowed)."""


@dataclass
class Decoded:
    """What one batch decodes to."""

    tokens: torch.Tensor
    """(batch, steps) chosen ids; the pad id after a row's `</s>`."""
    scores: list[float]
    """Mean log-probability per generated token, up to and including `</s>` (as predict._mean_log_prob)."""
    first_logits: torch.Tensor
    """(batch, vocab) raw logits of the first step (the empty answer's probability)."""
    step_logits: list[torch.Tensor] | None = None
    """Every step's raw logits over the whole batch (only when asked for, with no row leaving the batch)."""


def unsupported(model: Any) -> str | None:
    """Why the loop is not written for `model`; None where it is."""
    name = type(model).__name__
    if name not in WRITTEN_FOR:
        return f"written for {' and '.join(WRITTEN_FOR)}; this model is {name}"
    parameter = next(iter(model.parameters()), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        where = "no parameters" if parameter is None else f"{parameter.device.type} {parameter.dtype}"
        return f"written for fp32 on the CPU; this model is {where}"
    blocks = getattr(getattr(model, "decoder", None), "block", None)
    if not blocks or not all(len(block.layer) == 3 for block in blocks):
        return "its decoder blocks are not T5's self-attention, cross-attention and feed-forward layers"
    if not blocks[0].layer[0].SelfAttention.has_relative_attention_bias:
        return "its first decoder layer has no relative position bias"
    encoder_blocks = getattr(getattr(model, "encoder", None), "block", None)
    if not encoder_blocks or not all(len(block.layer) == 2 for block in encoder_blocks):
        return "its encoder blocks are not T5's self-attention and feed-forward layers"
    if not encoder_blocks[0].layer[0].SelfAttention.has_relative_attention_bias:
        return "its first encoder layer has no relative position bias"
    gen = getattr(model, "generation_config", None)
    for field, neutral in _NEUTRAL_GENERATION.items():
        value = getattr(gen, field, None)
        if value not in neutral:
            return f"its generation config sets {field}={value!r}, which transformers' generate applies"
    eos = _single(getattr(gen, "eos_token_id", None))
    if eos is None or _start_id(model) is None:
        return "its generation config names no single end token and decoder start token"
    return None


def _single(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(value) == 1 else None
    return None if value is None else int(value)


def _start_id(model: Any) -> int | None:
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    return _single(start)


def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    # T5LayerNorm: scale only, variance in fp32 (the stock module's arithmetic, fp32 weights).
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


class LeanGreedy:
    """Greedy decoding over a T5-family model's own modules and weights (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.heads, self.head_dim = int(config.num_heads), int(config.d_kv)
        # T5ForConditionalGeneration scales the decoder's output by d_model ** -0.5 where its config says so
        # (checkpoints with a tied output layer); transformers' MT5ForConditionalGeneration never does.
        self.scale_output = (type(model).__name__ == "T5ForConditionalGeneration"
                             and bool(getattr(config, "scale_decoder_outputs", False)))
        self.d_model = int(config.d_model)
        self.eos_id = _single(model.generation_config.eos_token_id)
        self.start_id = _start_id(model)
        pad = _single(getattr(model.generation_config, "pad_token_id", None))
        self.pad_id = pad if pad is not None else self.eos_id
        # T5 v1.0's feed-forward layer (one product, ReLU, one product): the first product and its ReLU in one
        # oneDNN call, 70 against 84 ms at 32 x 170 tokens x 512 -> 2048 (bench/ANSWERING_RESULTS.md).
        ff = model.encoder.block[0].layer[-1].DenseReluDense
        self.fused_relu = (type(ff).__name__ == "T5DenseActDense" and isinstance(ff.act, torch.nn.ReLU)
                           and getattr(ff.wi, "bias", None) is None and linear.onednn_linear_available())
        self.compactions = 0
        """How many times finished rows have left a batch (for tests and profiling)."""

    def _weights(self) -> dict[str, Any]:
        """The fused products' weights, from the model's current parameters (training changes them between
        evaluations, so they are read at every call: a copy of the decoder's attention weights)."""
        blocks = self.model.decoder.block
        attention = [block.layer[0].SelfAttention for block in blocks]
        cross = [block.layer[1].EncDecAttention for block in blocks]
        encoder = [block.layer[0].SelfAttention for block in self.model.encoder.block]
        return {
            "qkv": [torch.cat([a.q.weight, a.k.weight, a.v.weight]) for a in attention],
            "kv_all": torch.cat([w for a in cross for w in (a.k.weight, a.v.weight)]),
            "encoder_qkv": [torch.cat([a.q.weight, a.k.weight, a.v.weight]) for a in encoder],
        }

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: dict[str, Any]) -> torch.Tensor:
        """The encoder's output, from its own modules and weights: what T5Stack computes in eval mode, with the
        position bias and padding mask summed once for every layer (the stock code sums and copies them into
        each layer's attention again) and each layer's query, key and value products fused into one."""
        encoder = self.model.encoder
        heads, head_dim = self.heads, self.head_dim
        batch, length = input_ids.shape
        x = encoder.embed_tokens(input_ids)
        dtype = x.dtype
        bias = encoder.block[0].layer[0].SelfAttention.compute_bias(length, length)  # (1, heads, length, length)
        bias = (bias + ((1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]).contiguous()
        for i, block in enumerate(encoder.block):
            attention_layer, ff_layer = block.layer
            qkv = (F.linear(_rms(x, attention_layer.layer_norm), weights["encoder_qkv"][i])
                   .view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4))
            context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias, scale=1.0)
            x = x + attention_layer.SelfAttention.o(context.transpose(1, 2).reshape(batch, length, heads * head_dim))
            x = self._feed_forward(ff_layer, x)
        return _rms(x, encoder.final_layer_norm)

    def _feed_forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """x plus the feed-forward layer's output, in eval mode (its dropout does nothing)."""
        ff, hidden = layer.DenseReluDense, _rms(x, layer.layer_norm)
        if not self.fused_relu:
            return x + ff(hidden)
        shape = hidden.shape
        inner = torch.ops.mkldnn._linear_pointwise(hidden.reshape(-1, shape[-1]), ff.wi.weight, None, "relu", [], "")
        return x + ff.wo(inner.view(*shape[:-1], inner.shape[-1]))

    def _cross_keys_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: dict[str, Any],
                           chunk_rows: int | None) -> torch.Tensor:
        """Every decoder layer's cross-attention keys and values, (layers, 2, batch, heads, length, head_dim):
        the encoder in one pass, or in chunks of rows of similar length where that saves enough padding, with
        the keys and values of each chunk's padding left at zero (the padding mask hides them). `chunk_rows`
        overrides the choice: 0 one pass, k chunks of k rows."""
        heads, head_dim, layers = self.heads, self.head_dim, len(self.model.decoder.block)
        batch, length = input_ids.shape
        lengths = attention_mask.sum(-1)
        # Chunks cut the padding off the end of each row: only for right-padded rows (a mask of ones, then zeros).
        right_padded = bool((attention_mask == (torch.arange(length) < lengths[:, None])).all())
        order = torch.argsort(lengths, descending=True, stable=True)
        rows = chunk_rows or CHUNK_ROWS  # 0 and None: CHUNK_ROWS, whose saving decides below
        chunks = [order[i:i + rows] for i in range(0, batch, rows)]
        chunk_lengths = [max(int(lengths[c].max()), 1) for c in chunks]
        padded = sum(len(c) * n for c, n in zip(chunks, chunk_lengths))
        if (not right_padded or chunk_rows == 0
                or (chunk_rows is None and padded > (1.0 - CHUNK_SAVING) * batch * length)):
            encoded = self._encode(input_ids, attention_mask, weights)
            return (F.linear(encoded, weights["kv_all"]).view(batch, length, layers, 2, heads, head_dim)
                    .permute(2, 3, 0, 4, 1, 5).contiguous())
        # Each chunk's keys and values go straight into their place (64 x 384 tokens of t5-small's are 604 MB: no
        # second copy of them through a batch-first buffer); zero where a row's chunk ends.
        cross = None
        for chunk, n in zip(chunks, chunk_lengths):
            encoded = self._encode(input_ids[chunk, :n], attention_mask[chunk, :n], weights)
            kv = F.linear(encoded, weights["kv_all"]).view(len(chunk), n, layers, 2, heads, head_dim)
            if cross is None:
                cross = kv.new_zeros(layers, 2, batch, heads, length, head_dim)
            cross[:, :, chunk, :, :n] = kv.permute(2, 3, 0, 4, 1, 5)
        assert cross is not None
        return cross

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
               min_new_tokens: int = 0, allowed: Allowed | None = None, keep_step_logits: bool = False,
               chunk_rows: int | None = None) -> Decoded:
        """Greedy answers for a padded batch of source ids (batch, length) and its mask. `chunk_rows` fixes how
        the encoder runs (0: one pass; k: chunks of k rows) where the padding saved would decide (the proof runs
        both)."""
        model = self.model
        decoder = model.decoder
        blocks = decoder.block
        weights = self._weights()
        heads, head_dim = self.heads, self.head_dim
        inner = heads * head_dim
        layers = len(blocks)
        # Every layer's cross-attention keys and values in one product: (layers, 2, batch, heads, length, head_dim).
        cross = self._cross_keys_values(input_ids, attention_mask, weights, chunk_rows)
        _, _, batch, _, length, _ = cross.shape
        dtype = cross.dtype
        mask_bias = ((1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]
        steps = int(max_new_tokens)
        position_bias = blocks[0].layer[0].SelfAttention.compute_bias(steps, steps)  # (1, heads, steps, steps)
        keys = torch.empty(layers, batch, heads, steps, head_dim, dtype=dtype)
        values = torch.empty_like(keys)

        out = torch.full((batch, steps), self.pad_id, dtype=torch.long)
        total = torch.zeros(batch, dtype=torch.float64)
        counts = torch.zeros(batch, dtype=torch.long)
        rows = torch.arange(batch)  # the batch rows still in the loop
        alive = torch.ones(batch, dtype=torch.bool)  # of those, the ones not finished
        prefixes: list[list[int]] = [[] for _ in range(batch)]
        tokens = torch.full((batch,), self.start_id, dtype=torch.long)
        first_logits = torch.empty(0)
        step_logits: list[torch.Tensor] | None = [] if keep_step_logits else None
        for t in range(steps):
            x = decoder.embed_tokens(tokens)  # (rows, d_model)
            n = x.shape[0]
            for i, block in enumerate(blocks):
                self_layer, cross_layer, ff_layer = block.layer
                qkv = F.linear(_rms(x, self_layer.layer_norm), weights["qkv"][i]).view(n, 3, heads, 1, head_dim)
                keys[i, :, :, t] = qkv[:, 1, :, 0]
                values[i, :, :, t] = qkv[:, 2, :, 0]
                scores = torch.matmul(qkv[:, 0], keys[i, :, :, :t + 1].transpose(-1, -2))  # (rows, heads, 1, t+1)
                attention = torch.softmax(scores + position_bias[:, :, t:t + 1, :t + 1], dim=-1)
                context = torch.matmul(attention, values[i, :, :, :t + 1]).reshape(n, inner)
                x = x + self_layer.SelfAttention.o(context)
                query = cross_layer.EncDecAttention.q(_rms(x, cross_layer.layer_norm)).view(n, heads, 1, head_dim)
                scores = torch.matmul(query, cross[i, 0].transpose(-1, -2)) + mask_bias
                context = torch.matmul(torch.softmax(scores, dim=-1), cross[i, 1]).reshape(n, inner)
                x = x + cross_layer.EncDecAttention.o(context)
                x = self._feed_forward(ff_layer, x)
            x = _rms(x, decoder.final_layer_norm)
            if self.scale_output:
                x = x * (self.d_model ** -0.5)
            logits = model.lm_head(x).float()  # (rows, vocab)
            if t == 0:
                first_logits = logits
            if step_logits is not None:
                step_logits.append(logits)
            choose = logits
            if t < min_new_tokens:
                choose = choose.clone()
                choose[:, self.eos_id] = float("-inf")
            if allowed is not None:
                banned = torch.ones_like(choose, dtype=torch.bool)
                for j, row in enumerate(rows.tolist()):
                    if alive[j]:
                        banned[j, allowed(row, prefixes[row])] = False
                choose = choose.masked_fill(banned, float("-inf"))
            chosen = choose.argmax(-1)
            log_prob = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
            live_rows = rows[alive]
            out[live_rows, t] = chosen[alive]
            total[live_rows] += log_prob[alive].double()
            counts[live_rows] += 1
            for row, token in zip(live_rows.tolist(), chosen[alive].tolist()):
                prefixes[row].append(token)
            alive = alive & (chosen != self.eos_id)
            if not bool(alive.any()):
                break
            tokens = chosen
            finished = int((~alive).sum())
            if finished and finished >= COMPACT_SHARE * n and step_logits is None:
                keep = alive.nonzero().squeeze(1)
                self.compactions += 1
                rows, tokens, alive = rows[keep], tokens[keep], alive[keep]
                keys, values = keys[:, keep], values[:, keep]
                cross, mask_bias = cross[:, :, keep], mask_bias[keep]
        scores = (total / counts.clamp(min=1)).tolist()
        return Decoded(out, scores, first_logits, step_logits)


class LeanDecoding:
    """The loop for one Predictor's model, once it has proven itself (`prove`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.why_not = unsupported(model)
        self.loop = LeanGreedy(model) if self.why_not is None else None
        self.proven = self.why_not is not None

    @property
    def ready(self) -> bool:
        return self.proven and self.loop is not None  # a refused loop is dropped

    def prove(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        """Decide once, on the first rows of the first batch; returns why the loop is not used (None: it is)."""
        if self.proven:
            return self.why_not
        self.proven = True
        self.why_not = _differs(self.model, self.loop, input_ids, attention_mask)
        if self.why_not is not None:
            self.loop = None
        return self.why_not


def _differs(model: Any, loop: LeanGreedy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
    """Why the loop's logits differ from the stock forward pass's on the same decoder tokens; None where not."""
    # The batch's longest and shortest rows: padding in the one-pass encoder, and cross-attention keys and values
    # padded after a chunked one, both take part.
    lengths = attention_mask.sum(-1)
    picked = [int(lengths.argmax()), int(lengths.argmin())][:PROOF_ROWS]
    picked = list(dict.fromkeys(picked))  # one row where all are as long
    rows = len(picked)
    mask = attention_mask[picked]
    length = max(int(mask.sum(-1).max()), 1)
    ids, mask = input_ids[picked, :length], mask[:, :length]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # Both ways the encoder runs: one padded pass, and one row per chunk (each row's cross-attention keys
            # and values padded after the encoder).
            for chunk_rows in (0, 1):
                lean = loop.decode(ids, mask, max_new_tokens=PROOF_STEPS, min_new_tokens=PROOF_STEPS,
                                   keep_step_logits=True, chunk_rows=chunk_rows)
                steps = len(lean.step_logits or [])
                decoder = torch.cat([torch.full((rows, 1), loop.start_id, dtype=torch.long),
                                     lean.tokens[:, :steps - 1]], 1)
                stock = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits.float()
                why = logits_differ(stock, torch.stack(lean.step_logits or [], dim=1))  # (rows, steps, vocab)
                if why is not None:
                    return why + (" (encoder in chunks)" if chunk_rows else "")
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        return f"its pass failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    finally:
        model.train(was_training)
    return None


def logits_differ(stock: torch.Tensor, fast: torch.Tensor) -> str | None:
    """Why `fast` is not `stock` within LOGITS_RTOL of stock's largest magnitude (NaN included); None where it is."""
    scale = float(stock.abs().max())
    difference = float((fast - stock).abs().max())
    if not difference <= LOGITS_RTOL * max(scale, 1e-30):
        return f"logits differ by {difference / scale if scale else difference:.2g} of their largest ({TOLERANCE})"
    return None
