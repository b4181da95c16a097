"""CPU fast paths for training, switched on in one place: `enable(model, optimizer, config, ...)`.

- `dropout`: a cheaper dropout mask, kept as one byte per element, and attention's dropout inside the product
  with the values (dropout.py);
- `linear`: oneDNN for the linear layers' forward products and input gradients, in fp32 (linear.py);
- `norm`: the T5 family's layer norm as one autograd function, in fp32 (norm.py);
- `clip_in_step`: gradient clipping inside fused AdamW's step (clip.py);
- `allocator`: glibc keeps freed tensor memory while training (allocator.py).

Each runs only in CPU training and only on the classes it was written for (named in its module). The first
three prove themselves at start-up on the user's model and one micro-batch (proof.py: the stock loss within
1e-5, each parameter's gradient within 1e-3 of its norm); a path that does not is not used,
with one line saying which and why. `FastPaths.summary()` goes into run_summary.json. bench/RESULTS.md measures them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from t5qa.fastpath import allocator, clip, dropout, linear, norm
from t5qa.fastpath.proof import GRAD_RTOL, LOSS_ATOL, TOLERANCE, Candidate, prove

logger = logging.getLogger(__name__)

__all__ = ["FastPaths", "enable", "LOSS_ATOL", "GRAD_RTOL", "TOLERANCE"]

# The paths proven on the model, in the order they are proven, with their TrainConfig switch and CLI flag.
_MODEL_PATHS = {
    "dropout": (dropout.enable, dropout.disable, "fast_dropout"),
    "linear": (linear.enable, linear.disable, "fast_linear"),
    "norm": (norm.enable, norm.disable, "fast_norm"),
}
_FP32_ONLY = ("linear", "norm")


@dataclass
class FastPaths:
    """What `enable` switched on for one training run."""

    used: list[str] = field(default_factory=list)
    not_used: dict[str, str] = field(default_factory=dict)
    """Each path not used, and why."""
    proof_seconds: float | None = None
    optimizer: Any = None  # the torch optimizer, where clip_in_step is used

    def summary(self) -> dict[str, Any]:
        """For run_summary.json."""
        return {"used": list(self.used), "not_used": dict(self.not_used),
                "proof_seconds": None if self.proof_seconds is None else round(self.proof_seconds, 3),
                "tolerance": TOLERANCE}

    def limit_gradient_norm(self, accelerator: Any, model: nn.Module, parameters: list[nn.Parameter],
                            max_norm: float) -> torch.Tensor:
        """Make the coming optimizer step use gradients of total norm at most `max_norm`; returns their norm
        before. The gradients are clipped here (Accelerate's clip_grad_norm_), or, with clip_in_step, divided
        inside the fused optimizer's step."""
        if "clip_in_step" in self.used:
            return clip.clip_in_step(self.optimizer, parameters, max_norm)
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)

    @contextlib.contextmanager
    def in_effect(self) -> Iterator[None]:
        """The process-wide settings (the allocator) for the training loop; put back when the block ends."""
        with allocator.keep_freed_memory("allocator" in self.used):
            yield


def _flag(name: str) -> str:
    return "--no-" + name.replace("_", "-")


def enable(model: nn.Module, optimizer: torch.optim.Optimizer, config: Any, *, accelerator: Any,
           batch: dict[str, torch.Tensor]) -> FastPaths:
    """Switch on, in `model` and for `optimizer`, the fast paths that `config` (a TrainConfig) allows and that
    prove themselves on `batch` (one training micro-batch, on the CPU); called once, before accelerator.prepare.

    `accelerator` tells the device, the precision and the distributed setting."""
    from accelerate.utils import DistributedType

    fast = FastPaths()
    device = accelerator.device
    wanted = [name for name, (_, _, switch) in _MODEL_PATHS.items() if getattr(config, switch)]
    for name, (_, _, switch) in _MODEL_PATHS.items():
        if name not in wanted:
            fast.not_used[name] = f"switched off ({_flag(switch)})"
    if device.type != "cpu":
        for name in [*wanted, "clip_in_step", "allocator"]:
            fast.not_used[name] = f"written for CPU training; this run is on {device}"
        logger.info("fast paths: none (they are for CPU training; this run is on %s)", device)
        return fast

    candidates = {}
    for name in wanted:
        if name in _FP32_ONLY and config.precision != "fp32":
            fast.not_used[name] = f"written for fp32; this run is {config.precision}"
        elif name == "linear" and not linear.onednn_linear_available():
            fast.not_used[name] = "this PyTorch has no oneDNN linear operator that agrees with F.linear"
        else:
            enable_path, disable_path, _ = _MODEL_PATHS[name]
            candidates[name] = Candidate(enable_path, disable_path)
    if candidates:
        verdicts, fast.proof_seconds = prove(model, batch, candidates, autocast=accelerator.autocast)
        for name, why in verdicts.items():
            if why is None:
                _MODEL_PATHS[name][0](model)
                fast.used.append(name)
            else:
                fast.not_used[name] = why
                logger.warning("fast path %s not used: %s; the stock code runs", name, why)

    if config.max_grad_norm is None:
        fast.not_used["clip_in_step"] = "no clipping (--max-grad-norm none)"
    elif not clip.fits(optimizer):
        fast.not_used["clip_in_step"] = f"written for fused torch AdamW, not {type(optimizer).__name__}"
    elif accelerator.scaler is not None or accelerator.distributed_type not in (DistributedType.NO,
                                                                                 DistributedType.MULTI_CPU):
        fast.not_used["clip_in_step"] = f"written for one process or DDP without a loss scaler, not " \
                                        f"{accelerator.distributed_type}"
    elif not clip.proves_itself():
        fast.not_used["clip_in_step"] = "this torch's fused step does not divide by grad_scale as expected"
        logger.warning("fast path clip_in_step not used: %s; clip_grad_norm_ runs", fast.not_used["clip_in_step"])
    else:
        fast.used.append("clip_in_step")
        fast.optimizer = optimizer

    if not config.keep_freed_memory:
        fast.not_used["allocator"] = "switched off (--no-keep-freed-memory)"
    elif not allocator.available():
        fast.not_used["allocator"] = "needs glibc on Linux"
    else:
        fast.used.append("allocator")

    if fast.used:
        proof = f" (proven on one micro-batch in {fast.proof_seconds:.1f} s)" if fast.proof_seconds else ""
        logger.info("fast paths: %s%s", ", ".join(fast.used), proof)
    return fast
