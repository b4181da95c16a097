"""Gradient clipping inside fused Adam/AdamW's step.

torch's fused Adam and AdamW divide every gradient by `optimizer.grad_scale` when that attribute is set, in the
same pass that updates the weights: it is how torch.amp.GradScaler unscales them. Gradient clipping by norm is
such a division, by max(1, norm / max_norm), so handing it over there saves clip_grad_norm_'s separate multiply
over every gradient (bench/experiments/LEVERS.md).

Written for: exactly `torch.optim.AdamW` and `torch.optim.Adam` built with `fused=True`, on one process or under
DDP (where every process holds whole gradients) and with no fp16 loss scaler (which uses `grad_scale` itself).
`proves_itself` checks, once per process, that this torch's step really divides by `grad_scale` as stated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_proven: bool | None = None


def fits(optimizer: object) -> bool:
    """Whether `optimizer` (a torch optimizer, not a wrapper) is one this clipping was written for."""
    return (type(optimizer) in (torch.optim.AdamW, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
            and getattr(optimizer, "_step_supports_amp_scaling", False))


def clip_in_step(optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total 2-norm of the gradients, as clip_grad_norm_ returns it; the next optimizer.step() divides each
    gradient by max(1, (norm + 1e-6) / max_norm), what clip_grad_norm_ multiplies by (up to fp32 rounding).
    Only for an optimizer for which `fits` is true."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], 2.0, foreach=True)
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).to(torch.float32)  # type: ignore[attr-defined]
    return norm


@contextlib.contextmanager
def _without_global_optimizer_hooks() -> Iterator[None]:
    """torch's process-wide optimizer step hooks (`register_optimizer_step_post_hook`) belong to the user's
    optimizers: the check below must not fire them (a step counter would count its steps). torch keeps them in
    two module-level dicts; where this torch has none, the check runs with them."""
    from torch.optim import optimizer as torch_optimizer

    stores = [getattr(torch_optimizer, name, None) for name in ("_global_optimizer_pre_hooks",
                                                                "_global_optimizer_post_hooks")]
    saved = [dict(store) if isinstance(store, dict) else None for store in stores]
    for store in stores:
        if isinstance(store, dict):
            store.clear()
    try:
        yield
    finally:
        for store, kept in zip(stores, saved):
            if kept is not None:
                store.update(kept)


def proves_itself(atol: float = 1e-6) -> bool:
    """Whether, in this torch, two fused AdamW steps with clipping in the step give the weights that
    clip_grad_norm_ and a plain step give (gradients above and below the clipping norm). Checked once."""
    global _proven
    if _proven is None:
        try:
            with _without_global_optimizer_hooks():
                _proven = _check(atol)
        except (RuntimeError, TypeError, AttributeError):
            _proven = False
    return _proven


def _check(atol: float) -> bool:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(31, 17, generator=gen), torch.randn(17, generator=gen)]
    pairs = []
    for in_step in (False, True):
        params = [nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=True)
        for scale in (5.0, 0.01):  # one step clipped, one not
            for p, w in zip(params, weights):
                p.grad = w.sin() * scale
            if in_step:
                clip_in_step(optimizer, params, max_norm=1.0)
            else:
                nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        pairs.append(params)
    return fits(optimizer) and all(torch.allclose(a, b, atol=atol, rtol=0.0) for a, b in zip(*pairs))
