"""The T5 layer norm as one autograd function (`t5qa.fastpath.norm`)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import assert_same_training_step, micro_batch, micro_t5
from t5qa.fastpath import norm as fast_norm


def test_fast_norm_computes_the_t5_layer_norm_and_its_gradients() -> None:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(5)
    plain = T5LayerNorm(48, eps=1e-6)
    plain.weight.data.uniform_(0.5, 1.5)
    holder = nn.Sequential(T5LayerNorm(48, eps=1e-6))
    holder.load_state_dict({"0.weight": plain.weight.data})
    assert fast_norm.enable(holder) == 1
    fast = holder[0]
    assert isinstance(fast, T5LayerNorm) and type(fast) is not T5LayerNorm  # a subclass: isinstance still holds
    assert list(fast.state_dict()) == ["weight"]
    x = torch.randn(4, 9, 48) * 3
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    grad = torch.randn(4, 9, 48)
    outs = [plain(xs[0]), fast(xs[1])]
    assert torch.equal(outs[0], outs[1])  # the same operations in the same order
    assert outs[1].grad_fn.name() == "_RMSNormBackward"
    for out in outs:
        out.backward(grad)
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-5)
    assert torch.allclose(plain.weight.grad, fast.weight.grad, atol=1e-4)
    # a frozen weight gets no gradient and the input's still flows
    fast.weight.requires_grad_(False)
    fast.weight.grad = None
    x2 = x.clone().requires_grad_()
    fast(x2).backward(grad)
    assert fast.weight.grad is None and torch.allclose(x2.grad, xs[0].grad, atol=1e-5)
    fast.eval()  # outside training: transformers' own code
    assert fast(x).grad_fn is None or fast(x).grad_fn.name() != "_RMSNormBackward"
    assert fast_norm.enable(holder) == 0  # a second call changes nothing


def test_fast_norm_model_trains_the_same() -> None:
    plain, fast = micro_t5(0.0), micro_t5(0.0)
    fast.load_state_dict(plain.state_dict())
    assert fast_norm.enable(fast) == sum(type(m).__name__ == "T5LayerNorm" for m in plain.modules()) > 0
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert_same_training_step(plain, fast, micro_batch())
