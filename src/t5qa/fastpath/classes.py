"""What the fast paths share: the transformers classes they were written for, looked up as classes, and the test
of whether a layer is in the fp32 CPU training step where they use their own arithmetic."""

from __future__ import annotations

import importlib

import torch
from torch import nn


def transformers_classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes named (model folder, class name) in this transformers, skipping any it lacks. A fast path
    compares a module's type with these class objects, never with a class name (a T5Gemma attention class whose
    name ends like T5's is another class)."""
    found = []
    for folder, class_name in names:
        try:
            found.append(getattr(importlib.import_module(f"transformers.models.{folder}.modeling_{folder}"),
                                 class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def fp32_cpu_training(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` runs a training step on `x` in fp32 on the CPU: where the fast linear layer and layer norm
    use their own arithmetic (everywhere else they are the stock layer)."""
    return (module.training and x.device.type == "cpu" and x.dtype == torch.float32
            and module.weight.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))
