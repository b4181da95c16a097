"""The fast dropout (`t5qa.fastpath.dropout`): the mask's rate, independence and seeding, the swapped layers and
attention, and the same function as PyTorch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_same_training_step, micro_batch, micro_t5
from t5qa.fastpath import dropout as fast_dropout
from t5qa.fastpath.dropout import FastDropout, _as_float, dropout, dropped_product, keep_mask, kept_scale


def test_keep_mask_has_the_requested_rate_and_shape() -> None:
    torch.manual_seed(0)
    mask = keep_mask((1001, 999), 0.1)  # a size that is not a multiple of 4
    assert mask.shape == (1001, 999) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.9) < 0.002
    assert keep_mask((64, 64), 0.0).all()
    assert abs(keep_mask((1000, 1000), 0.5).float().mean().item() - 0.5) < 0.002


def test_keep_mask_elements_are_independent_of_their_neighbours() -> None:
    # Four mask elements come from one 64-bit draw: neighbours must not be correlated.
    torch.manual_seed(1)
    m = keep_mask((1_000_000,), 0.3).float()
    a, b = m[:-1], m[1:]
    correlation = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(correlation.item()) < 0.01


def test_dropout_keeps_or_zeroes_and_scales_like_torch() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 200)
    y = dropout(x, 0.1)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * kept_scale(0.1))
    assert abs(kept_scale(0.1) - 1 / 0.9) < 1e-4
    # unbiased: E[y] = x
    ones = torch.ones(2000, 1000)
    assert abs(dropout(ones, 0.1).mean().item() - 1.0) < 0.005
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    assert (dropout(x, 1.0) == 0).all()


def test_mask_converts_to_exact_zeros_and_ones() -> None:
    mask = keep_mask((5, 7, 11), 0.3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        converted = _as_float(mask, dtype)
        assert converted.dtype == dtype and converted.shape == mask.shape
        assert torch.equal(converted, mask.to(dtype))
    strided = mask[:, ::2].transpose(0, 2)  # a non-contiguous mask converts the same way
    assert torch.equal(_as_float(strided, torch.float32), strided.float())


def test_dropout_gradient_is_the_same_mask() -> None:
    torch.manual_seed(3)
    x = torch.ones(64, 128, requires_grad=True)
    y = dropout(x, 0.25)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask * scale = y when x is all ones


def test_dropout_follows_the_torch_seed() -> None:
    x = torch.randn(50, 50)
    torch.manual_seed(7)
    first = dropout(x, 0.2)
    torch.manual_seed(7)
    again = dropout(x, 0.2)
    torch.manual_seed(8)
    other = dropout(x, 0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_swapped_model_computes_the_same_function(attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, fast = micro_t5(0.1, attn), micro_t5(0.1, attn)
    fast.load_state_dict(plain.state_dict())
    swapped = fast_dropout.enable(fast)
    assert swapped > 0
    assert not [m for m in fast.modules() if type(m) is nn.Dropout]
    assert fast.config._attn_implementation.startswith("t5qa_fast_dropout")
    batch = micro_batch()
    for model in (plain, fast):
        model.eval()
    with torch.no_grad():  # eval: no dropout, so the outputs must agree
        assert torch.allclose(plain(**batch).logits, fast(**batch).logits, atol=1e-5)
    # Training with dropout switched off, forced through t5qa's own attention arithmetic, must give the same
    # loss and gradients as transformers' implementation.
    monkeypatch.setattr(fast_dropout, "_runs_fast", lambda module, p, query: module.training)
    for module in list(plain.modules()) + list(fast.modules()):
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    assert_same_training_step(plain, fast, batch)


def test_attention_dropout_runs_in_training() -> None:
    model = micro_t5(0.5)
    fast_dropout.enable(model)
    model.train()
    batch = micro_batch()
    torch.manual_seed(0)
    a = model(**batch).loss
    torch.manual_seed(1)
    b = model(**batch).loss
    torch.manual_seed(0)
    c = model(**batch).loss
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_attention_dropout_drops_attention_weights() -> None:
    model = micro_t5(0.3, "eager")
    fast_dropout.enable(model)
    model.train()
    for module in model.modules():  # only the attention weights keep their dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    logits = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        logits.append(model(**micro_batch()).logits)
    assert torch.equal(logits[0], logits[2])  # the masks follow the seed
    assert not torch.allclose(logits[0], logits[1])  # and drop something
    model.eval()
    with torch.no_grad():
        plain = model(**micro_batch()).logits
    assert not torch.allclose(plain, logits[0])
    # the weights returned with output_attentions are the softmax's, before dropout (t5qa applies the dropout
    # inside the product with the values)
    model.train()
    weights = model(**micro_batch(), output_attentions=True).encoder_attentions[0]
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


def test_gradient_checkpointing_replays_the_same_masks() -> None:
    batch = micro_batch()
    grads = []
    for checkpointing in (False, True):
        model = micro_t5(0.2)
        fast_dropout.enable(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(11)
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_fast_dropout_is_a_dropout_module() -> None:
    layer = FastDropout(0.3)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.3
    layer.eval()
    x = torch.randn(4, 4)
    assert layer(x) is x


def test_dropped_product_matches_dropout_then_product() -> None:
    weights = torch.softmax(torch.randn(2, 3, 40, 40), -1)
    value = torch.randn(2, 3, 40, 8)
    grad = torch.randn(2, 3, 40, 8)
    results = []
    for fused in (False, True):
        w, v = weights.clone().requires_grad_(), value.clone().requires_grad_()
        torch.manual_seed(11)  # the same mask draw both ways
        out = dropped_product(w, v, 0.2) if fused else torch.matmul(dropout(w, 0.2), v)
        out.backward(grad)
        results.append((out.detach(), w.grad, v.grad))
    assert results[1][0].grad_fn is None
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(results[1][0], torch.matmul(weights, value))  # something was dropped
    assert torch.equal(dropped_product(weights, value, 0.2, training=False), torch.matmul(weights, value))


@pytest.mark.parametrize("p", [1e-6, 1 - 1e-6, 1.0])  # round to 0 or to 1 in steps of 1/65536
def test_rates_the_mask_cannot_serve_are_left_to_pytorch(p: float) -> None:
    assert not fast_dropout.handles_rate(p)
    x = torch.randn(200, 300)
    torch.manual_seed(4)
    expected = nn.functional.dropout(x, p, True)
    torch.manual_seed(4)
    got = dropout(x, p)
    assert torch.equal(got, expected) and torch.isfinite(got).all()  # no division by zero near p = 1
    weights, value = torch.softmax(torch.randn(2, 5, 5), -1), torch.randn(2, 5, 3)
    torch.manual_seed(4)
    expected = torch.matmul(nn.functional.dropout(weights, p, True), value)
    torch.manual_seed(4)
    assert torch.equal(dropped_product(weights, value, p), expected)
    assert fast_dropout.handles_rate(1 / 65536) and fast_dropout.handles_rate(1 - 1 / 65536)


def test_disable_gives_the_model_back_as_it_was() -> None:
    model = micro_t5(0.1)
    before = [type(m) for m in model.modules()]
    assert fast_dropout.enable(model) > 0
    fast_dropout.disable(model)
    assert [type(m) for m in model.modules()] == before
    assert model.config._attn_implementation == "sdpa"
