"""The linear layers' forward products and input gradients through oneDNN, in fp32 CPU training.

Why this is written here: PyTorch's CPU `mm` calls MKL's sgemm; PyTorch's CPU builds also carry oneDNN, which
generates its kernels for the CPU it finds. On the benchmark machine (AMD EPYC with AVX-512) oneDNN computed the
linear layers' forward products faster (a 1600 x 512 x 2048 product: 15.8 against 17.9 ms; a whole t5-small
step on real batches 2-6% faster; bench/experiments/LEVERS.md). PyTorch reaches oneDNN's fp32 product only
through `torch.ops.mkldnn._linear_pointwise` (the operator torch.compile's CPU backend emits), which has no
autograd: the function below supplies the backward pass, with MKL's products as nn.Linear's has (oneDNN was not
faster there: its weight gradient needs both operands transposed, which it copies first). The operator is
private, so it is checked against F.linear once per process and skipped where missing or different.

Written for: exact `torch.nn.Linear` modules (turned into `FastLinear` in place).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from t5qa.fastpath.classes import fp32_cpu_training

logger = logging.getLogger(__name__)

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


class FastLinear(nn.Linear):
    """nn.Linear whose fp32 CPU training forward multiplies through oneDNN; same parameters and state dict.
    Outside training, off the CPU, under autocast or in other precisions it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fp32_cpu_training(self, x) and x.numel() and onednn_linear_available():
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


def enable(model: nn.Module) -> int:
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


def disable(model: nn.Module) -> None:
    """Undo `enable`: every FastLinear becomes an nn.Linear again."""
    for module in model.modules():
        if type(module) is FastLinear:
            module.__class__ = nn.Linear
