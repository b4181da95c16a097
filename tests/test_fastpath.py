"""CPU training fast paths (`t5qa.fastpath`): the cheaper dropout and glibc keeping freed memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_same_training_step
from t5qa import fastpath
from t5qa.fastpath import (FastDropout, FastLinear, _as_float, clip_in_step, clipping_fits_in_step, dropout,
                           keep_freed_memory, keep_mask, kept_scale, onednn_linear_available, use_fast_dropout,
                           use_fast_linear, use_fast_norm)

needs_onednn = pytest.mark.skipif(not onednn_linear_available(),
                                  reason="this PyTorch build has no oneDNN linear operator")


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


def _t5(dropout_rate: float, attn: str = "sdpa"):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                      dropout_rate=dropout_rate, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      relative_attention_num_buckets=8, attn_implementation=attn)
    return T5ForConditionalGeneration(config)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, 64, (3, 5), generator=g)}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_swapped_model_computes_the_same_function(attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, fast = _t5(0.1, attn), _t5(0.1, attn)
    fast.load_state_dict(plain.state_dict())
    swapped = use_fast_dropout(fast)
    assert swapped > 0
    assert not [m for m in fast.modules() if type(m) is nn.Dropout]
    assert fast.config._attn_implementation.startswith("t5qa_fast_dropout")
    batch = _batch()
    for model in (plain, fast):
        model.eval()
    with torch.no_grad():  # eval: no dropout, so the outputs must agree
        assert torch.allclose(plain(**batch).logits, fast(**batch).logits, atol=1e-5)
    # Training with dropout switched off, forced through t5qa's own attention arithmetic, must give the same
    # loss and gradients as transformers' implementation.
    monkeypatch.setattr(fastpath, "_runs_fast", lambda module, p, query: module.training)
    for module in list(plain.modules()) + list(fast.modules()):
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    assert_same_training_step(plain, fast, batch, grad_atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [17, 180])  # 3 x 17 rows: input gradient by MKL; 3 x 180: by oneDNN
def test_fast_linear_computes_linear_and_its_gradients(bias: bool, tokens: int) -> None:
    torch.manual_seed(4)
    plain = nn.Linear(24, 40, bias=bias)
    fast = nn.Linear(24, 40, bias=bias)
    fast.load_state_dict(plain.state_dict())
    assert use_fast_linear(fast) == 1 and type(fast) is FastLinear
    assert (3 * tokens >= fastpath._INPUT_GRAD_ONEDNN_MIN_ROWS) == (tokens == 180)
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
    plain, fast = _t5(0.0), _t5(0.0)
    fast.load_state_dict(plain.state_dict())
    swapped = use_fast_linear(fast)
    assert swapped == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    assert fast.lm_head.weight is fast.shared.weight  # tied in place, nothing copied
    assert list(fast.state_dict()) == list(plain.state_dict())
    batch = _batch()
    assert_same_training_step(plain, fast, batch, grad_atol=1e-4)


def test_fast_linear_changes_nothing_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "_onednn_ok", False)
    model = _t5(0.0)
    assert use_fast_linear(model) == 0
    assert not any(isinstance(m, FastLinear) for m in model.modules())


def test_attention_dropout_runs_in_training() -> None:
    model = _t5(0.5)
    use_fast_dropout(model)
    model.train()
    batch = _batch()
    torch.manual_seed(0)
    a = model(**batch).loss
    torch.manual_seed(1)
    b = model(**batch).loss
    torch.manual_seed(0)
    c = model(**batch).loss
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_attention_dropout_drops_attention_weights() -> None:
    model = _t5(0.3, "eager")
    use_fast_dropout(model)
    model.train()
    for module in model.modules():  # only the attention weights keep their dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    logits = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        logits.append(model(**_batch()).logits)
    assert torch.equal(logits[0], logits[2])  # the masks follow the seed
    assert not torch.allclose(logits[0], logits[1])  # and drop something
    model.eval()
    with torch.no_grad():
        plain = model(**_batch()).logits
    assert not torch.allclose(plain, logits[0])
    # the weights returned with output_attentions are the softmax's, before dropout (t5qa applies the dropout
    # inside the product with the values)
    model.train()
    weights = model(**_batch(), output_attentions=True).encoder_attentions[0]
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


def test_gradient_checkpointing_replays_the_same_masks() -> None:
    batch = _batch()
    grads = []
    for checkpointing in (False, True):
        model = _t5(0.2)
        use_fast_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_keep_freed_memory_stops_remapping_memory_every_step() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    # t5-small's vocabulary and width, one layer: its 64 MiB embedding gradient is above glibc's largest mmap
    # threshold, so by default every step maps it (and other large blocks) afresh: tens of thousands of faults.
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_ff=512, d_kv=32, num_heads=4,
                                                num_layers=1, num_decoder_layers=1, decoder_start_token_id=0))
    model.train()
    batch = {"input_ids": torch.randint(2, 32128, (4, 64)), "labels": torch.randint(2, 32128, (4, 8))}

    def faults_of_a_step() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with keep_freed_memory() as kept:
        if not kept:
            pytest.skip("not glibc")
        first = faults_of_a_step()  # the heap grows to the step's size once
        with keep_freed_memory():  # a nested block (a fit() inside another) must not undo the setting
            pass
        later = sorted(faults_of_a_step() for _ in range(5))
    assert later[2] < first / 5, (first, later)  # later steps reuse the heap's pages
    with keep_freed_memory(False) as kept:
        assert kept is False


def test_training_uses_the_fast_paths_unless_switched_off(tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from t5qa.modeling import ensure_generation_ids, save_model
    from t5qa.train import fit, setup
    from test_train import tiny_config

    model = _t5(0.1)
    model.resize_token_embeddings(len(tiny_tokenizer))
    ensure_generation_ids(model, tiny_tokenizer)
    model_dir = tmp_path / "model"
    save_model(model, tiny_tokenizer, model_dir, {})

    run = setup(tiny_config(model_dir, tmp_path / "off", fast_dropout=False, fast_linear=False, fast_norm=False))
    assert not any(isinstance(m, (FastDropout, FastLinear)) for m in run.model.modules())
    assert not any(type(m).__name__.startswith("Fast") for m in run.model.modules())
    assert run.summary["fast_dropout"] is False and run.summary["fast_linear"] is False
    assert run.summary["fast_norm"] is False

    result = fit(tiny_config(model_dir, tmp_path / "on", max_steps=2))
    summary = json.loads((tmp_path / "on" / "run" / "run_summary.json").read_text())
    assert summary["fast_dropout"] is True
    assert summary["fast_linear"] is onednn_linear_available()
    assert summary["fast_norm"] is True and summary["clip_in_optimizer_step"] is True
    # what is saved is a plain model: no trace of t5qa's attention function in its config
    assert "t5qa" not in (result.output_dir / "last" / "config.json").read_text()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir / "last")
    assert reloaded.config._attn_implementation in ("sdpa", "eager")


def test_fast_norm_computes_the_t5_layer_norm_and_its_gradients() -> None:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(5)
    plain = T5LayerNorm(48, eps=1e-6)
    plain.weight.data.uniform_(0.5, 1.5)
    holder = nn.Sequential(T5LayerNorm(48, eps=1e-6))
    holder.load_state_dict({"0.weight": plain.weight.data})
    assert use_fast_norm(holder) == 1
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
    assert use_fast_norm(holder) == 0  # a second call changes nothing


def test_fast_norm_model_trains_the_same() -> None:
    plain, fast = _t5(0.0), _t5(0.0)
    fast.load_state_dict(plain.state_dict())
    assert use_fast_norm(fast) == sum(type(m).__name__ == "T5LayerNorm" for m in plain.modules()) > 0
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert_same_training_step(plain, fast, _batch(), grad_atol=1e-4)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping active, and a norm below the limit
def test_clipping_inside_fused_adamw_matches_clip_grad_norm(max_norm: float) -> None:
    models = [_t5(0.0), _t5(0.0)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01, fused=True) for m in models]
    assert clipping_fits_in_step(optimizers[1])
    for step in range(2):
        for model in models:
            model(**_batch()).loss.backward()
        expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
        norm = clip_in_step(optimizers[1], list(models[1].parameters()), max_norm)
        assert torch.allclose(norm, expected, rtol=1e-5)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert torch.allclose(p, q, atol=1e-6), (step, name)
    # what it relies on: the fused step divides by grad_scale; other optimizers do not fit
    assert not clipping_fits_in_step(torch.optim.AdamW(models[0].parameters(), lr=1e-2))
    from transformers.optimization import Adafactor
    assert not clipping_fits_in_step(Adafactor(models[0].parameters(), lr=1e-3, relative_step=False,
                                               scale_parameter=False))


def test_dropped_product_matches_dropout_then_product() -> None:
    from t5qa.fastpath import dropped_product

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
