"""The optimizer and schedule of a training run (`t5qa.optim`)."""

from __future__ import annotations

import pytest
import torch

from t5qa.config import load_train_config
from t5qa.optim import make_optimizer, make_scheduler


def test_no_weight_decay_on_biases_and_norms(tiny_model) -> None:
    from t5qa.optim import no_decay_names

    model, _ = tiny_model
    names = no_decay_names(model)
    norm_weights = {n for n, _ in model.named_parameters() if "layer_norm" in n}
    assert norm_weights and norm_weights <= names
    assert not any("SelfAttention.q" in n or n == "shared.weight" for n in names)


def test_weight_decay_goes_only_to_the_weights_that_take_it(tiny_model) -> None:
    model, _ = tiny_model
    optimizer = make_optimizer(model, load_train_config(None, weight_decay=0.1, learning_rate=1e-3))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.1, 0.0}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, after_warmup, at_end", [("linear", 1e-3, 0.0), ("constant", 1e-3, 1e-3)])
def test_the_schedule_warms_up_then_follows_its_shape(tiny_model, name, after_warmup, at_end) -> None:
    model, _ = tiny_model
    cfg = load_train_config(None, learning_rate=1e-3, warmup_steps=2, lr_scheduler=name)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=10)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[0] == 0.0 and rates[1] == pytest.approx(5e-4)  # warm-up from zero
    assert rates[2] == pytest.approx(after_warmup) and rates[10] == pytest.approx(at_end)
