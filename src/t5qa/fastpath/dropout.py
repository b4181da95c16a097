"""The fast dropout: a cheaper mask on CPU, kept as one byte per element, and attention's dropout applied inside
the product with the values.

Why this is written here: on CPU, PyTorch's dropout draws its mask with `bernoulli_`, one double-precision
uniform from the serial Mersenne Twister per element (MKL's vectorised path is taken only on Intel CPUs). For
t5-small that mask cost 15-23% of a training step, more than everything but the matrix multiplies
(bench/experiments/LEVERS.md). No maintained library offers a faster CPU dropout, so this one draws 64 random bits
per four elements from the same torch generator and compares 16-bit slices with a threshold: 8x fewer generator
calls, and the comparison is vectorised and multi-threaded. It keeps the mask as a bool tensor for the backward
pass (1 byte per element, against the 4-byte float mask PyTorch keeps), which also lowers peak memory. In attention
the dropout is applied inside the product with the values (`dropped_product`), so the dropped weights are
recomputed in the backward pass instead of kept.

The drop probability is rounded to a multiple of 1/65536 (0.1 becomes 0.1000061), and the kept values are scaled
by 1 / (1 - that probability), so the layer stays unbiased. A rate that rounds to 0 or to 1 (below 2^-17 or above
1 - 2^-17) is left to PyTorch's dropout. The bits come from torch's default generator, so `torch.manual_seed`,
checkpointed RNG state (exact resume) and activation recomputation behave as with PyTorch's dropout. Off the CPU,
and outside training, the layers defer to PyTorch.

Written for: exact `torch.nn.Dropout` modules (swapped for `FastDropout`), and the attention classes in
`VERIFIED_ATTENTION_CLASSES`, whose attention function is replaced through transformers' AttentionInterface.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from t5qa.fastpath.classes import transformers_classes

logger = logging.getLogger(__name__)

_LEVELS = 1 << 16  # the mask compares 16-bit random integers with a threshold
ATTENTION_NAME = "t5qa_fast_dropout"  # registered with transformers' AttentionInterface


def handles_rate(p: float) -> bool:
    """Whether the fast mask serves drop rate `p`: one that rounds to neither 0 nor 1 in steps of 1/65536."""
    return 0 < round(p * _LEVELS) < _LEVELS


# ------------------------------------------------------------------------------------------------ mask tape
# The start-up proof (proof.py) runs one micro-batch through the stock model and through the fast one with the
# same dropout masks: the first pass records every mask drawn, the next ones replay them in order.


class TapeMismatch(RuntimeError):
    """A replayed pass asked for a mask the recorded pass did not draw."""


class _Tape:
    def __init__(self, masks: list[torch.Tensor] | None = None) -> None:
        self.replaying = masks is not None
        self.masks: list[torch.Tensor] = masks if masks is not None else []
        self.position = 0

    def take(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        if self.position >= len(self.masks) or tuple(self.masks[self.position].shape) != tuple(shape):
            raise TapeMismatch(f"dropout call {self.position + 1} of shape {tuple(shape)} was not in the stock pass")
        self.position += 1
        return self.masks[self.position - 1]


_tape: _Tape | None = None


@contextlib.contextmanager
def mask_tape(replay: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the block every dropout mask comes from `keep_mask`, also PyTorch's own `F.dropout` calls (as in
    BART's layers): recorded into the yielded list, or, with `replay`, taken from it in order."""
    global _tape
    tape = _Tape(replay)
    previous_tape, stock_dropout = _tape, nn.functional.dropout

    def taped_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
                      ) -> torch.Tensor:
        if not training or p == 0.0:
            return input
        if not handles_rate(p):
            raise TapeMismatch(f"drop rate {p} is left to PyTorch, whose masks cannot be replayed")
        kept = keep_mask(input.shape, p).view(torch.uint8).to(input.dtype)  # PyTorch's arithmetic, t5qa's mask
        kept.mul_(kept_scale(p))
        return input.mul_(kept) if inplace else input * kept

    _tape = tape
    nn.functional.dropout = taped_dropout
    try:
        yield tape.masks
        if tape.replaying and tape.position != len(tape.masks):
            raise TapeMismatch(f"the stock pass drew {len(tape.masks)} dropout masks, this one {tape.position}")
    finally:
        nn.functional.dropout = stock_dropout
        _tape = previous_tape


# ------------------------------------------------------------------------------------------------ the mask


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor of `shape`, each element True (kept) with probability 1 - round(p * 65536) / 65536."""
    if _tape is not None and _tape.replaying:
        return _tape.take(shape)
    numel = math.prod(shape)
    # random_ over the full int64 range gives 64 uniform bits per draw; viewed as int16, four uniform values.
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    threshold = round(p * _LEVELS) - _LEVELS // 2  # int16 values are uniform on [-32768, 32767]
    mask = (bits.view(torch.int16)[:numel] >= threshold).view(shape)
    if _tape is not None:
        _tape.masks.append(mask)
    return mask


def kept_scale(p: float) -> float:
    """1 / (1 - the drop probability `keep_mask` really uses)."""
    return 1.0 / (1.0 - round(p * _LEVELS) / _LEVELS)


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 0.0 / 1.0 in `dtype`, converted through its uint8 view: PyTorch's bool-to-float copy is
    not vectorised on CPU, the uint8-to-float one is (1.73 against 0.56 ms for 5.8M elements on the benchmark
    machine; bench/experiments/LEVERS.md). A bool tensor holds only 0 and 1 bytes, so the view is exact."""
    return mask.view(torch.uint8).to(dtype)


def _masked(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """x * mask * scale in one pass: addcmul(0, a, b, value=s) (measured faster than a * (mask * s) in a t5-small
    step); the zero is a 0-dim tensor broadcast over the output."""
    return torch.addcmul(x.new_zeros(()), x, _as_float(mask, x.dtype), value=scale)


class _MaskAndScale(torch.autograd.Function):
    """y = x * mask * scale, keeping only the bool mask for the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return _masked(x, mask, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return _masked(grad, mask, ctx.scale), None, None


class _DroppedProduct(torch.autograd.Function):
    """(weights * mask * scale) @ value, keeping weights (which softmax keeps anyway), the bool mask and value for
    the backward pass, and recomputing the dropped weights there. Applied separately, the dropped attention
    weights are kept until the backward pass: 37.7 MiB per layer at 8 x 8 heads x 384 x 384 tokens."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(weights, value, mask)
        ctx.scale = scale
        return torch.matmul(_masked(weights, mask, scale), value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, value, mask = ctx.saved_tensors
        grad_value = None
        if ctx.needs_input_grad[1]:
            grad_value = torch.matmul(_masked(weights, mask, ctx.scale).transpose(-1, -2), grad)
        grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_weights = _masked(torch.matmul(grad, value.transpose(-1, -2)), mask, ctx.scale)
        return grad_weights, grad_value, None, None


def _fast(x: torch.Tensor, p: float, training: bool) -> bool:
    return training and x.device.type == "cpu" and x.is_floating_point() and handles_rate(p)


def dropped_product(weights: torch.Tensor, value: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """dropout(weights, p) @ value, with less memory kept for the backward pass (same mask draw as `dropout`)."""
    if not _fast(weights, p, training):
        return torch.matmul(dropout(weights, p, training), value)
    return _DroppedProduct.apply(weights, value, keep_mask(weights.shape, p), kept_scale(p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.dropout` (not in place), fast on CPU."""
    if not training or p == 0.0:
        return x
    if not _fast(x, p, training):
        return nn.functional.dropout(x, p, training)
    return _MaskAndScale.apply(x, keep_mask(x.shape, p), kept_scale(p))


class FastDropout(nn.Dropout):
    """nn.Dropout whose CPU training path uses `dropout` above; same p, same state dict (none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


# ------------------------------------------------------------------------------------------------ attention

# Attention modules whose stock attention function is the plain product written below (scores * scaling, plus
# position bias and an additive mask, softmax in fp32, dropout, product with the values), checked in
# tests/test_fastpath_families.py. Any other class (T5Gemma's soft-capped attention, say) keeps its own code.
VERIFIED_ATTENTION_CLASSES = (("t5", "T5Attention"), ("mt5", "MT5Attention"), ("umt5", "UMT5Attention"),
                              ("longt5", "LongT5Attention"), ("bart", "BartAttention"))

_verified_attention: tuple[type, ...] | None = None

# Arguments the attention below does not implement: where one is set, the stock function runs.
_UNHANDLED_ATTENTION_ARGS = ("softcap", "sliding_window", "s_aux", "sinks")


def verified_attention() -> tuple[type, ...]:
    global _verified_attention
    if _verified_attention is None:
        _verified_attention = transformers_classes(VERIFIED_ATTENTION_CLASSES)
    return _verified_attention


def _runs_fast(module: nn.Module, dropout_p: float, query: torch.Tensor) -> bool:
    """Whether t5qa's attention runs for this call: in training, with attention dropout, on the CPU."""
    return module.training and dropout_p > 0.0 and query.device.type == "cpu"


def _stock_attention(module: nn.Module, fallback: str) -> Any:
    """The attention function the model had before: a registered one, or its own module's eager function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if fallback != "eager":
        return ALL_ATTENTION_FUNCTIONS[fallback]
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout_p: float = 0.0,
               position_bias: torch.Tensor | None = None, fallback: str = "sdpa", **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for transformers' AttentionInterface: the eager computation with `dropout` on the weights.

    Only in training, and only for the verified attention classes; every other call (evaluation, generation,
    another class, an argument such as `softcap` that this code does not implement) runs the model's own
    implementation (`fallback`), so outside training the model computes exactly what transformers computes.
    """
    dropout_p = kwargs.pop("dropout", dropout_p)
    if (not _runs_fast(module, dropout_p, query) or type(module) not in verified_attention()
            or any(kwargs.get(name) is not None for name in _UNHANDLED_ATTENTION_ARGS)):
        return _stock_attention(module, fallback)(module, query, key, value, attention_mask, scaling=scaling,
                                                  dropout=dropout_p, position_bias=position_bias, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat key/value heads
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if scale != 1.0:
        scores.mul_(scale)
    if position_bias is not None:
        scores.add_(position_bias)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:  # True = attend
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        else:  # additive
            scores.add_(mask)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    # The weights returned (seen only with output_attentions) are those before dropout.
    output = dropped_product(weights, value, dropout_p, module.training).transpose(1, 2).contiguous()
    return output, weights


# ------------------------------------------------------------------------------------------------ on and off


def enable(model: nn.Module) -> int:
    """Swap every exact nn.Dropout of `model` for FastDropout, and its attention-weight dropout where every
    attention class is a verified one and the model dispatches attention through transformers'
    AttentionInterface. Returns how many layers were swapped (attention counts as one)."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout and not child.inplace:
                setattr(module, name, FastDropout(child.p))
                swapped += 1
    return swapped + _enable_attention(model)


def disable(model: nn.Module) -> None:
    """Undo `enable`: PyTorch's dropout modules and the attention function the model had."""
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is FastDropout:
                setattr(module, name, nn.Dropout(child.p))
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if isinstance(current, str) and current.startswith(ATTENTION_NAME + "_"):
        model.set_attn_implementation(current[len(ATTENTION_NAME) + 1:])


def _enable_attention(model: nn.Module) -> int:
    verified = verified_attention()
    kinds = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")}
    others = sorted(k.__name__ for k in kinds if k not in verified)
    if not kinds or others:
        if others:
            logger.info("fast attention dropout: not used for %s (verified only for %s); PyTorch's dropout runs",
                        ", ".join(others), ", ".join(k.__name__ for k in verified))
        return 0
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", "eager") or not hasattr(model, "set_attn_implementation"):
        return 0  # flash / flex / custom kernels: leave them alone
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return 0
    name = f"{ATTENTION_NAME}_{current}"

    def attention(*args: Any, **kwargs: Any) -> Any:
        return _attention(*args, fallback=current, **kwargs)

    AttentionInterface.register(name, attention)
    # Additive float masks with causality spelled out (never "is_causal with no mask"), which every path here and
    # the sdpa fallback accept.
    AttentionMaskInterface.register(name, eager_mask)
    try:
        model.set_attn_implementation(name)
    except (ValueError, TypeError, AttributeError) as exc:
        logger.debug("attention dropout left to PyTorch: %s", exc)
        return 0
    return 1 if model.config._attn_implementation == name else 0
