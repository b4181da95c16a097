"""Clipping inside fused AdamW's step (`t5qa.fastpath.clip`)."""

from __future__ import annotations

import pytest
import torch

from conftest import micro_batch, micro_t5
from t5qa.fastpath import clip


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping active, and a norm below the limit
def test_clipping_inside_fused_adamw_matches_clip_grad_norm(max_norm: float) -> None:
    models = [micro_t5(0.0), micro_t5(0.0)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01, fused=True) for m in models]
    assert clip.fits(optimizers[1])
    for step in range(2):
        for model in models:
            model(**micro_batch()).loss.backward()
        expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
        norm = clip.clip_in_step(optimizers[1], list(models[1].parameters()), max_norm)
        assert torch.allclose(norm, expected, rtol=1e-5)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert torch.allclose(p, q, atol=1e-6), (step, name)
    # what it relies on: the fused step divides by grad_scale; other optimizers do not fit
    assert not clip.fits(torch.optim.AdamW(models[0].parameters(), lr=1e-2))
    from transformers.optimization import Adafactor
    assert not clip.fits(Adafactor(models[0].parameters(), lr=1e-3, relative_step=False,
                                               scale_parameter=False))


def test_this_torch_divides_by_grad_scale_in_the_fused_step() -> None:
    assert clip.proves_itself()
    params = list(micro_t5(0.0).parameters())
    assert clip.fits(torch.optim.Adam(params, lr=1e-3, fused=True))

    class MyAdamW(torch.optim.AdamW):  # a subclass may step differently: not the class this was written for
        pass

    assert not clip.fits(MyAdamW(params, lr=1e-3, fused=True))


def test_the_check_does_not_fire_the_users_global_optimizer_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    monkeypatch.setattr(clip, "_proven", None)  # check again in this process
    steps = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(optimizer))
    try:
        assert clip.proves_itself()
        assert steps == []  # a benchmark's or a user's step counter sees no step of the check
        params = list(micro_t5(0.0).parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        assert steps == [optimizer]  # and their hooks are back afterwards
    finally:
        handle.remove()
