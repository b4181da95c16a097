"""The T5 family's layer norm as one autograd function, in fp32 CPU training.

The T5 family's layer norm (RMS norm: no mean, no bias): transformers writes it as five tensor operations, whose
autograd keeps three activations and makes about a dozen passes over them. The same function written once, with
its gradient by hand, keeps the input and one value per row: 1.23 against 1.73 ms forward+backward on 8 x 165 x 512
(bench/experiments/LEVERS.md). PyTorch's own F.rms_norm was slower on CPU (its backward pass is composite).
Classes known to compute weight * x / sqrt(mean(x^2) + variance_epsilon), in fp32, with `weight` and
`variance_epsilon` attributes.

Written for: the classes in `RMS_NORM_CLASSES`, compared as classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from t5qa.fastpath.classes import fp32_cpu_training, transformers_classes

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
    if fp32_cpu_training(self, hidden_states):
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return super(type(self), self).forward(hidden_states)


_fast_norm_classes: dict[type, type] = {}


def enable(model: nn.Module) -> int:
    """Give every T5-family layer norm of `model` the single-function forward and backward above, in place (a
    subclass of its own class, so isinstance checks, parameters and the state dict are unchanged). Used in fp32
    CPU training only; elsewhere the layer runs transformers' code. Returns how many layers changed."""
    verified = transformers_classes(RMS_NORM_CLASSES)  # the classes themselves, not their names
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


def disable(model: nn.Module) -> None:
    """Undo `enable`: every swapped layer norm gets its transformers class back."""
    fast_to_stock = {fast: stock for stock, fast in _fast_norm_classes.items()}
    for module in model.modules():
        if type(module) in fast_to_stock:
            module.__class__ = fast_to_stock[type(module)]
