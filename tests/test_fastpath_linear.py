"""oneDNN linear layers (`t5qa.fastpath.linear`): the same function and gradients as nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_same_training_step, micro_batch, micro_t5
from t5qa.fastpath import linear as fast_linear
from t5qa.fastpath.linear import FastLinear, onednn_linear_available

needs_onednn = pytest.mark.skipif(not onednn_linear_available(),
                                  reason="this PyTorch build has no oneDNN linear operator")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [17, 180])  # 3 x 17 rows: input gradient by MKL; 3 x 180: by oneDNN
def test_fast_linear_computes_linear_and_its_gradients(bias: bool, tokens: int) -> None:
    torch.manual_seed(4)
    plain = nn.Linear(24, 40, bias=bias)
    fast = nn.Linear(24, 40, bias=bias)
    fast.load_state_dict(plain.state_dict())
    assert fast_linear.enable(fast) == 1 and type(fast) is FastLinear
    assert (3 * tokens >= fast_linear._INPUT_GRAD_ONEDNN_MIN_ROWS) == (tokens == 180)
    x = torch.randn(3, tokens, 24)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    grad = torch.randn(3, tokens, 40)
    outs = [layer(inp) for layer, inp in zip((plain, fast), xs)]
    assert outs[1].shape == outs[0].shape and torch.allclose(outs[0], outs[1], atol=1e-5)
    assert outs[1].grad_fn.name() == "_OneDNNLinearBackward"  # the oneDNN path really ran
    for out in outs:
        out.backward(grad)
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-5)
    for p, q in zip(plain.parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4)
    # a frozen layer (LoRA's base weights) gives no weight gradient and still passes the input's on
    fast.weight.requires_grad_(False)
    fast.weight.grad = None
    x2 = x.clone().requires_grad_()
    fast(x2).sum().backward()
    assert fast.weight.grad is None
    assert torch.allclose(x2.grad, fast.weight.sum(0).expand_as(x2), atol=1e-5)
    fast.eval()  # outside training: exactly nn.Linear
    assert torch.equal(fast(x), nn.functional.linear(x, fast.weight, fast.bias))


@needs_onednn
def test_fast_linear_model_keeps_tied_weights_and_trains_the_same() -> None:
    plain, fast = micro_t5(0.0), micro_t5(0.0)
    fast.load_state_dict(plain.state_dict())
    swapped = fast_linear.enable(fast)
    assert swapped == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    assert fast.lm_head.weight is fast.shared.weight  # tied in place, nothing copied
    assert list(fast.state_dict()) == list(plain.state_dict())
    batch = micro_batch()
    assert_same_training_step(plain, fast, batch)


def test_fast_linear_changes_nothing_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_linear, "_onednn_ok", False)
    model = micro_t5(0.0)
    assert fast_linear.enable(model) == 0
    assert not any(isinstance(m, FastLinear) for m in model.modules())
