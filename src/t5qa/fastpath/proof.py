"""The start-up proof: each fast path shows, on the user's model and one of their micro-batches, that it computes
the stock model's loss and gradients.

One pass runs the stock model in training mode with its attention set to transformers' eager implementation
(the reference code the others are written against), recording every dropout mask it draws; then the model with
every candidate path on runs the same micro-batch with the same masks replayed. The loss must agree within
LOSS_ATOL and each parameter's gradient within GRAD_RTOL of its norm. Where the paths together do not, each is
tried alone, and only those that agree alone are used. The RNG state is put back afterwards, so the proof
changes nothing in the run that follows (seeding, exact resume).

The micro-batch is cut to its first examples up to PROOF_TOKENS input tokens (at least one example): two passes
of a t5-small over 1,024 tokens take about 6 s on two cores. 1,024 rows reach the branch of the linear layer that
starts at 512 (linear.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from t5qa.fastpath.dropout import TapeMismatch, mask_tape

LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-3
GRAD_ATOL = 1e-8  # per element, for gradients that are zero or nearly


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


# Gradients are compared as whole tensors, by relative L2 distance, not element by element: a gradient element is
# a sum of terms, and when they nearly cancel (query and key weights in an untrained model's softmax, a ReLU unit
# at its kink) fp32 rounding in any order of summation moves it by more than its own size. On a random-init
# t5-small, oneDNN's products (each within 4e-7 of fp64, as MKL's) moved the encoder's query, key and FFN gradients
# by up to 3.3e-4 of their norm, and single elements by 2e-3 of the tensor's largest; a wrong gradient (1% off in
# one layer) is 1e-2 of its norm.
TOLERANCE = (f"loss within {_short(LOSS_ATOL)}; each parameter's gradient within {_short(GRAD_RTOL)} of its "
             f"norm (||fast - stock|| <= {_short(GRAD_RTOL)} x ||stock||)")


PROOF_TOKENS = 1024


def proof_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first examples of `batch` holding up to PROOF_TOKENS input tokens, at least one."""
    lengths = batch["attention_mask"].sum(-1) if "attention_mask" in batch else None
    rows = batch["input_ids"].shape[0]
    keep, total = 0, 0
    while keep < rows:
        total += int(lengths[keep]) if lengths is not None else batch["input_ids"].shape[1]
        if keep and total > PROOF_TOKENS:
            break
        keep += 1
    return {k: v[:keep] if isinstance(v, torch.Tensor) and v.shape[:1] == (rows,) else v for k, v in batch.items()}


@dataclass
class Pass:
    loss: float
    grads: dict[str, torch.Tensor]


def _run(model: nn.Module, batch: dict[str, torch.Tensor], autocast: Callable[[], Any]) -> Pass:
    for p in model.parameters():
        p.grad = None
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    # The gradient tensors themselves, taken off the parameters (no copy: a t5-small's are 240 MB).
    grads = {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return Pass(float(loss.detach()), grads)


def difference(reference: Pass, candidate: Pass) -> str | None:
    """Why `candidate` is not the reference pass to within the tolerance; None where it is."""
    if not (abs(candidate.loss - reference.loss) <= LOSS_ATOL):
        return f"loss {candidate.loss:.7g} against the stock {reference.loss:.7g} (tolerance {LOSS_ATOL:g})"
    if candidate.grads.keys() != reference.grads.keys():
        missing = sorted(candidate.grads.keys() ^ reference.grads.keys())
        return f"gradients for other parameters ({missing[0]})"
    for name, want in reference.grads.items():
        distance = float((candidate.grads[name] - want).norm())
        norm = float(want.norm())
        if not distance <= GRAD_RTOL * norm + GRAD_ATOL * want.numel() ** 0.5:  # also catches NaN
            return (f"gradient of {name} differs by {distance / norm if norm else distance:.2g} of its norm "
                    f"({TOLERANCE})")
    return None


@dataclass
class Candidate:
    """A fast path to prove: how to switch it on (returns how many layers changed) and off again."""

    enable: Callable[[nn.Module], int]
    disable: Callable[[nn.Module], None]


def prove(model: nn.Module, batch: dict[str, torch.Tensor], candidates: dict[str, Candidate], *,
          autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[dict[str, str | None], float]:
    """Each candidate's verdict (None: proven; else why not) and the seconds the proof took. Leaves every
    candidate off, the model in training mode with its own attention, no gradients and the RNG as it was."""
    started = time.perf_counter()
    batch = proof_batch(batch)
    rng = torch.random.get_rng_state()
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    to_eager = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    was_training = model.training
    model.train()

    def trial(names: list[str]) -> dict[str, str | None]:
        """Verdicts for `names` switched on together (each gets the same verdict)."""
        on = []
        try:
            for name in names:
                on.append(name)
                if not candidates[name].enable(model):
                    return {name: "nothing in this model is a layer it was written for"}
            with mask_tape(replay=masks):
                why = difference(reference, _run(model, batch, autocast))
        except (TapeMismatch, RuntimeError, ValueError, TypeError) as exc:
            why = f"its pass failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        finally:
            for name in reversed(on):
                candidates[name].disable(model)
        return {name: why for name in names}

    try:
        if to_eager:
            model.set_attn_implementation("eager")
        with mask_tape() as masks:
            reference = _run(model, batch, autocast)
        names = list(candidates)
        verdicts = trial(names) if len(names) > 1 else {}
        if set(verdicts) != set(names) or any(v is not None for v in verdicts.values()):
            verdicts = {}
            for name in names:  # find which ones disagree
                verdicts.update(trial([name]))
    finally:
        if to_eager:
            model.set_attn_implementation(attention)
        torch.random.set_rng_state(rng)
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    return verdicts, time.perf_counter() - started
