"""CPU fast paths for training: a cheaper dropout (`use_fast_dropout`), oneDNN for the linear layers' forward
products and input gradients (`use_fast_linear`), the T5 layer norm as one autograd function (`use_fast_norm`),
gradient clipping inside the fused AdamW step (`clip_in_step`) and an allocator setting (`keep_freed_memory`).
bench/RESULTS.md measures them.

Dropout. Why this is written here: on CPU, PyTorch's dropout draws its mask with `bernoulli_`, one double-precision
uniform from the serial Mersenne Twister per element (MKL's vectorised path is taken only on Intel CPUs). For
t5-small that mask cost 15-23% of a training step, more than everything but the matrix multiplies
(bench/experiments/LEVERS.md). No maintained library offers a faster CPU dropout, so this one draws 64 random bits
per four elements from the same torch generator and compares 16-bit slices with a threshold: 8x fewer generator calls,
and the comparison is vectorised and multi-threaded. It keeps the mask as a bool tensor for the backward pass
(1 byte per element, against the 4-byte float mask PyTorch keeps), which also lowers peak memory. In attention
the dropout is applied inside the product with the values (`dropped_product`), so the dropped weights are
recomputed in the backward pass instead of kept.

The drop probability is rounded to a multiple of 1/65536 (0.1 becomes 0.1000061), and the kept values are scaled
by 1 / (1 - that probability), so the layer stays unbiased. The bits come from torch's default generator, so
`torch.manual_seed`, checkpointed RNG state (exact resume) and activation recomputation behave as with
PyTorch's dropout. Off the CPU, and outside training, the layers defer to PyTorch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

_LEVELS = 1 << 16  # the mask compares 16-bit random integers with a threshold
ATTENTION_NAME = "t5qa_fast_dropout"  # registered with transformers' AttentionInterface


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor of `shape`, each element True (kept) with probability 1 - round(p * 65536) / 65536."""
    numel = math.prod(shape)
    # random_ over the full int64 range gives 64 uniform bits per draw; viewed as int16, four uniform values.
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    threshold = round(p * _LEVELS) - _LEVELS // 2  # int16 values are uniform on [-32768, 32767]
    return (bits.view(torch.int16)[:numel] >= threshold).view(shape)


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


def dropped_product(weights: torch.Tensor, value: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """dropout(weights, p) @ value, with less memory kept for the backward pass (same mask draw as `dropout`)."""
    if (not training or p == 0.0 or weights.device.type != "cpu" or not weights.is_floating_point()
            or p >= 1.0):
        return torch.matmul(dropout(weights, p, training), value)
    return _DroppedProduct.apply(weights, value, keep_mask(weights.shape, p), kept_scale(p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.dropout` (not in place), fast on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    return _MaskAndScale.apply(x, keep_mask(x.shape, p), kept_scale(p))


class FastDropout(nn.Dropout):
    """nn.Dropout whose CPU training path uses `dropout` above; same p, same state dict (none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


def _transformers_classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes named (model folder, class name) in this transformers, skipping any it lacks."""
    import importlib

    found = []
    for folder, class_name in names:
        try:
            found.append(getattr(importlib.import_module(f"transformers.models.{folder}.modeling_{folder}"),
                                 class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


# Attention modules whose stock attention function is the plain product written below (scores * scaling, plus
# position bias and an additive mask, softmax in fp32, dropout, product with the values), checked in
# tests/test_families.py. Any other class (T5Gemma's soft-capped attention, say) keeps its own code.
VERIFIED_ATTENTION_CLASSES = (("t5", "T5Attention"), ("mt5", "MT5Attention"), ("umt5", "UMT5Attention"),
                              ("longt5", "LongT5Attention"), ("bart", "BartAttention"))


_VERIFIED_ATTENTION: tuple[type, ...] | None = None

# Arguments the attention below does not implement: where one is set, the stock function runs.
_UNHANDLED_ATTENTION_ARGS = ("softcap", "sliding_window", "s_aux", "sinks")


def _runs_fast(module: nn.Module, dropout_p: float, query: torch.Tensor) -> bool:
    """Whether t5qa's attention runs for this call: in training, with attention dropout, on the CPU."""
    return module.training and dropout_p > 0.0 and query.device.type == "cpu"


def _stock_attention(module: nn.Module, fallback: str) -> Any:
    """The attention function the model had before: a registered one, or its own module's eager function."""
    import sys

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
    if (not _runs_fast(module, dropout_p, query) or type(module) not in _VERIFIED_ATTENTION
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


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout of `model` for FastDropout, and its attention-weight dropout where the model
    dispatches attention through transformers' AttentionInterface. Returns how many layers were swapped
    (attention counts as one)."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout and not child.inplace:
                setattr(module, name, FastDropout(child.p))
                swapped += 1
    swapped += _use_fast_attention_dropout(model)
    return swapped


def _use_fast_attention_dropout(model: nn.Module) -> int:
    global _VERIFIED_ATTENTION
    if _VERIFIED_ATTENTION is None:
        _VERIFIED_ATTENTION = _transformers_classes(VERIFIED_ATTENTION_CLASSES)
    kinds = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")}
    others = sorted(k.__name__ for k in kinds if k not in _VERIFIED_ATTENTION)
    if not kinds or others:
        if others:
            logger.info("fast attention dropout: not used for %s (verified only for %s); PyTorch's dropout runs",
                        ", ".join(others), ", ".join(k.__name__ for k in _VERIFIED_ATTENTION))
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


# ------------------------------------------------------------------------------------------------ linear layers
# Why this is written here: PyTorch's CPU `mm` calls MKL's sgemm; PyTorch's CPU builds also carry oneDNN, which
# generates its kernels for the CPU it finds. On the benchmark machine (AMD EPYC with AVX-512) oneDNN computed the
# linear layers' forward products faster (a 1600 x 512 x 2048 product: 15.8 against 17.9 ms; a whole t5-small
# step on real batches 2-6% faster; bench/experiments/LEVERS.md). PyTorch reaches oneDNN's fp32 product only
# through `torch.ops.mkldnn._linear_pointwise` (the operator torch.compile's CPU backend emits), which has no
# autograd: the function below supplies the backward pass, with MKL's products as nn.Linear's has (oneDNN was not
# faster there: its weight gradient needs both operands transposed, which it copies first). The operator is
# private, so it is checked against F.linear once per process and skipped where missing or different.

_onednn_ok: bool | None = None


def _onednn(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ weight.T (+ bias) through oneDNN; rows is 2-D, weight is (out, in)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear operator and it agrees with F.linear (checked once)."""
    global _onednn_ok
    if _onednn_ok is None:
        try:
            gen = torch.Generator().manual_seed(0)
            rows, weight, bias, grad = (torch.randn(37, 19, generator=gen), torch.randn(23, 19, generator=gen),
                                        torch.randn(23, generator=gen), torch.randn(37, 23, generator=gen))
            _onednn_ok = bool(torch.backends.mkldnn.is_available()
                              and torch.allclose(_onednn(rows, weight, bias), nn.functional.linear(rows, weight, bias),
                                                 rtol=1e-5, atol=1e-5)
                              and torch.allclose(_onednn(rows, weight, None), rows @ weight.t(), rtol=1e-5, atol=1e-5)
                              # the input gradient's form: grad @ W as a linear layer with weight W^T
                              and torch.allclose(_onednn(grad, weight.t().contiguous(), None), grad @ weight,
                                                 rtol=1e-5, atol=1e-5))
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            logger.debug("oneDNN linear unavailable: %s", exc)
            _onednn_ok = False
    return _onednn_ok


# The input gradient goes through oneDNN from this many rows (tokens) up. Below it, transposing the weight costs
# more than oneDNN saves: at 72 rows x 512 x 2048 the copy takes 0.6 ms and oneDNN saves 0.13 ms; at 1320 rows it
# saves 1-4 ms (bench/experiments/LEVERS.md). In t5-small this picks the encoder's layers and the decoder's
# cross-attention keys and values, and leaves the decoder's other layers and the output layer to MKL.
_INPUT_GRAD_ONEDNN_MIN_ROWS = 512


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b: the forward product and the input gradient through oneDNN, the weight gradient through MKL.

    On this project's CPUs oneDNN is 5-25% faster than MKL's sgemm for the forward product and for the input
    gradient of many rows (grad @ W, handed over as a linear layer whose weight is W^T copied contiguous), but not
    for the weight gradient (grad^T @ x), whose operands both need transposing (bench/experiments/LEVERS.md).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        return _onednn(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            if grad_rows.shape[0] >= _INPUT_GRAD_ONEDNN_MIN_ROWS:
                # W^T copied contiguous: handed oneDNN as a strided view, it reordered the weight itself and the
                # process's peak memory grew by about 400 MiB on t5-small (bench/experiments/LEVERS.md)
                grad_x = _onednn(grad_rows, weight.t().contiguous(), None)
            else:
                grad_x = grad_rows.mm(weight)
            grad_x = grad_x.view(ctx.input_shape)
        grad_w = grad_rows.t().mm(rows) if ctx.needs_input_grad[1] else None
        grad_b = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _fp32_cpu_training(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` runs a training step on `x` in fp32 on the CPU: where FastLinear and the fast layer norm
    use their own arithmetic."""
    return (module.training and x.device.type == "cpu" and x.dtype == torch.float32
            and module.weight.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


class FastLinear(nn.Linear):
    """nn.Linear whose fp32 CPU training forward multiplies through oneDNN; same parameters and state dict.
    Outside training, off the CPU, under autocast or in other precisions it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fp32_cpu_training(self, x) and x.numel() and onednn_linear_available():
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


def use_fast_linear(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into a FastLinear, in place (so tied weights stay tied and nothing is
    copied). Returns how many; 0, changing nothing, where oneDNN's operator is missing."""
    if not onednn_linear_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            swapped += 1
    return swapped


# ------------------------------------------------------------------------------------------------ layer norm

# The T5 family's layer norm (RMS norm: no mean, no bias): transformers writes it as five tensor operations, whose
# autograd keeps three activations and makes about a dozen passes over them. The same function written once, with
# its gradient by hand, keeps the input and one value per row: 1.23 against 1.73 ms forward+backward on 8 x 165 x 512
# (bench/experiments/LEVERS.md). PyTorch's own F.rms_norm was slower on CPU (its backward pass is composite).
# Classes known to compute weight * x / sqrt(mean(x^2) + variance_epsilon), in fp32, with `weight` and
# `variance_epsilon` attributes.
RMS_NORM_CLASSES = (("t5", "T5LayerNorm"), ("mt5", "MT5LayerNorm"), ("umt5", "UMT5LayerNorm"),
                    ("longt5", "LongT5LayerNorm"))


class _RMSNorm(torch.autograd.Function):
    """y = w * x * rstd with rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)  # the same operations, in the same order, as transformers' forward

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        grad_w = (grad * normed).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d/dx of x * rstd: rstd * (g - normed * mean(g * normed))
            grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x, grad_w, None


def _fast_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if _fp32_cpu_training(self, hidden_states):
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return super(type(self), self).forward(hidden_states)


_fast_norm_classes: dict[type, type] = {}


def use_fast_norm(model: nn.Module) -> int:
    """Give every T5-family layer norm of `model` the single-function forward and backward above, in place (a
    subclass of its own class, so isinstance checks, parameters and the state dict are unchanged). Used in fp32
    CPU training only; elsewhere the layer runs transformers' code. Returns how many layers changed."""
    verified = _transformers_classes(RMS_NORM_CLASSES)  # the classes themselves, not their names
    swapped = 0
    for module in model.modules():
        cls = type(module)
        if cls not in verified:  # exact classes only (a swapped layer's class is not in the set either)
            continue
        if not (isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon")):
            continue
        if cls not in _fast_norm_classes:
            _fast_norm_classes[cls] = type("Fast" + cls.__name__, (cls,), {"forward": _fast_norm_forward,
                                                                            "__module__": __name__})
        module.__class__ = _fast_norm_classes[cls]
        swapped += 1
    return swapped


# ------------------------------------------------------------------------------------------------ clipping

def clipping_fits_in_step(optimizer: Any) -> bool:
    """Whether `optimizer` (a torch optimizer, not a wrapper) can clip gradients inside its own step.

    torch's fused Adam and AdamW divide every gradient by `optimizer.grad_scale` when that attribute is set, in the
    same pass that updates the weights: it is how torch.amp.GradScaler unscales them. Gradient clipping by norm is
    such a division, by max(1, norm / max_norm), so handing it over there saves clip_grad_norm_'s separate
    multiply over every gradient (bench/experiments/LEVERS.md)."""
    return (isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
            and getattr(optimizer, "_step_supports_amp_scaling", False))


def clip_in_step(optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total 2-norm of the gradients, as clip_grad_norm_ returns it; the next optimizer.step() divides each
    gradient by max(1, (norm + 1e-6) / max_norm), what clip_grad_norm_ multiplies by (up to fp32 rounding).
    Only for an optimizer for which clipping_fits_in_step() is true."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], 2.0, foreach=True)
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).to(torch.float32)  # type: ignore[attr-defined]
    return norm


# ------------------------------------------------------------------------------------------------ allocator

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX_DEFAULT = 65536
_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_kept_depth = 0  # nested keep_freed_memory blocks (a fit() inside another's callback)


def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not take these settings)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, glibc serves large blocks from its heap and keeps what is freed for reuse.

    PyTorch's CPU allocator calls malloc/free for every tensor. glibc hands blocks over 32 MiB (and, until its
    adaptive threshold has grown, those over 128 KiB) to mmap, and returns them with munmap when freed; it also
    trims the heap's top beyond 64 MiB. So each training step maps and zero-fills much of the same memory again:
    about 88,000 page faults per t5-small step (bench/experiments/LEVERS.md). Without mmap and with a high trim
    threshold the heap keeps those pages and later steps reuse them (about 1,000 faults per step; a step with a
    new largest batch shape still grows the heap). Peak memory measured the same or lower; the difference is that
    the process keeps its peak until the block ends, when the free memory is handed back (malloc_trim).

    Yields whether the setting took effect (glibc on Linux only; elsewhere the block runs unchanged).
    """
    global _kept_depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _kept_depth += 1
    try:
        yield True
    finally:
        _kept_depth -= 1
        if not _kept_depth:  # else an enclosing block still wants the memory kept
            # glibc's adaptive thresholds cannot be switched back on; set what they grow to on their own (mmap
            # above 32 MiB, trim above 64 MiB), so later work in this process gets no more page faults than usual.
            libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
            libc.malloc_trim(0)
