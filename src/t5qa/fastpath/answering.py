"""CPU fast paths for answering: what `predict.TorchBackend` switches on around transformers' `generate`.

- `linear`: every `F.linear` call inside one batch's `generate` goes to oneDNN's product (linear.py), through a
  torch function mode. No module of the model is swapped or changed, and decoding stays transformers' own
  `generate` (greedy, beam search, every setting of it), so nothing else can drift from the stock code. On the
  benchmark shapes oneDNN is 1.2-1.5x MKL's speed for the encoder's products and 2.4x for the output layer's
  (32 x 512 x 32,128); bench/RESULTS.md measures whole runs.
- `allocator`: glibc keeps freed memory between the batches of one `answer_many` call (allocator.py): each batch
  otherwise maps and faults in its activations afresh.
- `decoding`: greedy answers from a lean loop over the T5 family's own modules (decoding.py: a cache allocated
  once, cross-attention keys and values in one product, finished rows leaving the batch) instead of `generate`;
  it proves itself on the first greedy batch (its logits against the stock forward pass's, decoding.TOLERANCE).

Written for: fp32 models on the CPU, with no gradients (answering runs under inference mode). The linear path
proves itself once per Predictor, on its model and its first batch: one forward pass over up to PROOF_ROWS inputs
and PROOF_DECODER_TOKENS decoder positions must give the stock code's logits within LOGITS_RTOL of their largest
magnitude. Where it does not, or cannot be tried, one line says why and the stock code answers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from t5qa.fastpath import allocator, decoding, linear

logger = logging.getLogger(__name__)

LOGITS_RTOL = decoding.LOGITS_RTOL
PROOF_ROWS = 2
PROOF_DECODER_TOKENS = 4
TOLERANCE = decoding.TOLERANCE


class OneDNNLinear(TorchFunctionMode):
    """Within the block, `F.linear` on fp32 CPU tensors that need no gradient runs as oneDNN's product; every
    other call runs unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            rows = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _fits(rows, weight, bias):
                shape = rows.shape
                flat = rows.reshape(-1, shape[-1])
                out = linear._onednn(flat if flat.is_contiguous() else flat.contiguous(), weight, bias)
                return out.view(*shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def _fits(rows: Any, weight: Any, bias: Any) -> bool:
    tensors = (rows, weight) if bias is None else (rows, weight, bias)
    return (all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # oneDNN's has no backward
            and weight.dim() == 2 and weight.is_contiguous() and rows.dim() >= 1
            and (bias is None or bias.dim() == 1))


class FastAnswering:
    """The fast paths one Predictor's torch backend answers with: the allocator where the model is fp32 on the
    CPU, and the linear path once it has proven itself on the first batch (`prove`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.used: list[str] = []
        self.not_used: dict[str, str] = {}
        self._proven = False
        parameter = next(iter(model.parameters()), None)
        if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            where = "no parameters" if parameter is None else f"{parameter.device.type} {parameter.dtype}"
            self.not_used = {name: f"written for fp32 on the CPU; this model is {where}"
                             for name in ("linear", "allocator", "decoding")}
            self._proven = True
            self.lean = None
            return
        self.lean: decoding.LeanDecoding | None = decoding.LeanDecoding(model)
        if self.lean.why_not is not None:
            self.not_used["decoding"] = self.lean.why_not
            self.lean = None
        if allocator.available():
            self.used.append("allocator")
        else:
            self.not_used["allocator"] = "needs glibc on Linux"
        if not linear.onednn_linear_available():
            self.not_used["linear"] = "this PyTorch has no oneDNN linear operator that agrees with F.linear"
            self._proven = True

    def summary(self) -> dict[str, Any]:
        return {"used": list(self.used), "not_used": dict(self.not_used), "tolerance": TOLERANCE,
                "decoding_tolerance": decoding.TOLERANCE}

    def lean_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      enabled: bool = True) -> decoding.LeanGreedy | None:
        """The lean greedy loop where it is written for the model and proven (on this first batch, once), else
        None: `generate` answers."""
        if not enabled or self.lean is None:
            return None
        if not self.lean.proven:
            with self.linear(enabled):
                why = self.lean.prove(input_ids, attention_mask)
            if why is None:
                self.used.append("decoding")
            else:
                self.not_used["decoding"] = why
                logger.warning("fast answering path decoding not used: %s; transformers' generate answers", why)
        return self.lean.loop if self.lean.ready else None

    def prove(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Decide the linear path on the first rows of the first batch (the padded source ids and mask); once."""
        if self._proven:
            return
        self._proven = True
        why = _linear_differs(self.model, input_ids, attention_mask)
        if why is None:
            self.used.append("linear")
        else:
            self.not_used["linear"] = why
            logger.warning("fast answering path linear not used: %s; the stock code answers", why)

    def linear(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """The block one batch's `generate` runs in."""
        return OneDNNLinear() if enabled and "linear" in self.used else contextlib.nullcontext()

    @contextlib.contextmanager
    def in_effect(self, enabled: bool = True) -> Iterator[None]:
        """The process-wide setting (the allocator) for the batches of one call; put back when the block ends."""
        with allocator.keep_freed_memory(enabled and "allocator" in self.used):
            yield


def _linear_differs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
    """Why oneDNN's products do not give `model`'s stock logits within LOGITS_RTOL; None where they do."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        return "the model names no decoder start token to prove it with"
    rows = min(PROOF_ROWS, input_ids.shape[0])
    mask = attention_mask[:rows]
    length = max(int(mask.sum(-1).max()), 1)
    ids, mask = input_ids[:rows, :length], mask[:, :length]
    # The decoder reads the start token and the first source tokens: any ids will do to compare two passes.
    decoder = torch.cat([torch.full((rows, 1), int(start), dtype=ids.dtype), ids[:, :PROOF_DECODER_TOKENS - 1]], 1)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            stock = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits.float()
            with OneDNNLinear():
                fast = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits.float()
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"its pass failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    finally:
        model.train(was_training)
    return decoding.logits_differ(stock, fast)
