"""`t5qa.fastpath.enable`: the one switch for the CPU fast paths. Each proves itself on the model and a micro-batch
(the stock loss and gradients, to the tolerance the README states) or is not used, with one line; training uses
them unless switched off, and learns the same with them as without."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import micro_batch, micro_t5
from t5qa import fastpath
from t5qa.config import load_train_config
from t5qa.fastpath import dropout as fast_dropout
from t5qa.fastpath import norm as fast_norm
from t5qa.fastpath.linear import FastLinear, onednn_linear_available
from t5qa.fastpath.proof import Candidate, prove

README = Path(__file__).resolve().parents[1] / "README.md"


def _cpu_accelerator(precision: str = "no") -> SimpleNamespace:
    from contextlib import nullcontext

    from accelerate.utils import DistributedType

    return SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext, scaler=None,
                           distributed_type=DistributedType.NO, mixed_precision=precision)


def _config(**overrides):
    return load_train_config(None, model="unused", train="unused", **overrides)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)


def test_every_path_proves_itself_on_a_t5_and_is_switched_on() -> None:
    model = micro_t5(0.1)
    rng = torch.random.get_rng_state()
    fast = fastpath.enable(model, _optimizer(model), _config(), accelerator=_cpu_accelerator(), batch=micro_batch())
    expected = {"dropout", "norm", "clip_in_step", "allocator"} | ({"linear"} if onednn_linear_available() else set())
    assert set(fast.used) == expected, fast.not_used
    assert torch.equal(torch.random.get_rng_state(), rng)  # the proof leaves the run's random stream alone
    assert all(p.grad is None for p in model.parameters())
    assert any(isinstance(m, fast_dropout.FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "t5qa_fast_dropout_sdpa"  # the model's own function behind it
    assert any(type(m).__name__ == "FastT5LayerNorm" for m in model.modules())
    summary = fast.summary()
    assert summary["used"] == fast.used and summary["proof_seconds"] > 0
    assert summary["tolerance"] == fastpath.TOLERANCE


def test_a_path_that_changes_the_gradients_is_not_used(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    backward = fast_norm._RMSNorm.backward

    def off_by_a_little(ctx, grad):  # a wrong gradient, 1% too large: what a broken fast path would give
        grad_x, grad_w, _ = backward(ctx, grad)
        return grad_x * 1.01, grad_w, None

    monkeypatch.setattr(fast_norm._RMSNorm, "backward", staticmethod(off_by_a_little))
    model = micro_t5(0.1)
    with caplog.at_level(logging.WARNING, logger="t5qa"):
        fast = fastpath.enable(model, _optimizer(model), _config(), accelerator=_cpu_accelerator(),
                               batch=micro_batch())
    assert "norm" not in fast.used and "dropout" in fast.used
    assert "gradient of" in fast.not_used["norm"] and "differs" in fast.not_used["norm"]
    lines = [r.getMessage() for r in caplog.records if "fast path norm" in r.getMessage()]
    assert len(lines) == 1 and "the stock code runs" in lines[0] and "\n" not in lines[0]
    assert not any(type(m).__name__.startswith("FastT5") for m in model.modules())  # stock layer norms


def test_a_path_that_changes_the_loss_is_not_used() -> None:
    model = micro_t5(0.1)

    def enable_wrong(m: nn.Module) -> int:  # scales every layer norm's weight: another function
        for module in m.modules():
            if type(module).__name__ == "T5LayerNorm":
                module.weight.data.mul_(1.5)
        return 1

    def disable_wrong(m: nn.Module) -> None:
        for module in m.modules():
            if type(module).__name__ == "T5LayerNorm":
                module.weight.data.div_(1.5)

    verdicts, seconds = prove(model, micro_batch(), {"wrong": Candidate(enable_wrong, disable_wrong)})
    assert verdicts["wrong"].startswith("loss ") and seconds > 0


def test_the_proof_replays_the_stock_dropout_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    # With dropout at 0.3 the stock and fast passes agree only if they drop the same elements: the proof is
    # meaningful with dropout on, and a fast dropout that drew its own masks would fail it.
    model = micro_t5(0.3)
    verdicts, _ = prove(model, micro_batch(), {"dropout": Candidate(fast_dropout.enable, fast_dropout.disable)})
    assert verdicts == {"dropout": None}
    assert model.config._attn_implementation == "sdpa" and not any(
        isinstance(m, fast_dropout.FastDropout) for m in model.modules())  # left as it was

    real_keep_mask = fast_dropout.keep_mask

    def fresh_masks(shape, p, generator=None):  # ignores the tape: new random masks
        tape, fast_dropout._tape = fast_dropout._tape, None
        try:
            return real_keep_mask(shape, p, generator)
        finally:
            fast_dropout._tape = tape

    original_forward = fast_dropout.FastDropout.forward
    monkeypatch.setattr(fast_dropout.FastDropout, "forward", lambda self, x: fast_dropout._MaskAndScale.apply(
        x, fresh_masks(x.shape, self.p), fast_dropout.kept_scale(self.p)) if self.training else original_forward(
        self, x))
    verdicts, _ = prove(model, micro_batch(), {"dropout": Candidate(fast_dropout.enable, fast_dropout.disable)})
    assert verdicts["dropout"] is not None


def test_switched_off_paths_and_other_devices_are_recorded_not_used() -> None:
    model = micro_t5(0.1)
    config = dataclasses.replace(_config(fast_dropout=False, fast_linear=False, keep_freed_memory=False),
                                 max_grad_norm=None)
    fast = fastpath.enable(model, _optimizer(model), config, accelerator=_cpu_accelerator(), batch=micro_batch())
    assert fast.used == ["norm"]
    assert fast.not_used["dropout"] == "switched off (--no-fast-dropout)"
    assert fast.not_used["allocator"] == "switched off (--no-keep-freed-memory)"
    assert "--max-grad-norm" in fast.not_used["clip_in_step"]

    gpu = _cpu_accelerator()
    gpu.device = torch.device("cuda", 0)
    model = micro_t5(0.1)
    fast = fastpath.enable(model, _optimizer(model), _config(), accelerator=gpu, batch=micro_batch())
    assert fast.used == [] and fast.proof_seconds is None
    assert set(fast.not_used) == {"dropout", "linear", "norm", "clip_in_step", "allocator"}
    assert not any(isinstance(m, (fast_dropout.FastDropout, FastLinear)) for m in model.modules())

    bf16 = fastpath.enable(micro_t5(0.1), _optimizer(micro_t5(0.1)), _config(precision="bf16"),
                           accelerator=_cpu_accelerator("bf16"), batch=micro_batch())
    assert bf16.not_used["norm"] == "written for fp32; this run is bf16"


def test_clipping_in_the_step_only_for_fused_adamw() -> None:
    model = micro_t5(0.0)
    plain_adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    fast = fastpath.enable(model, plain_adamw, _config(), accelerator=_cpu_accelerator(), batch=micro_batch())
    assert "clip_in_step" not in fast.used and "fused torch AdamW" in fast.not_used["clip_in_step"]


def test_the_readme_states_the_tolerance_the_proof_checks() -> None:
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"loss must agree within {fastpath.LOSS_ATOL:.0e}".replace("e-0", "e-") in text
    assert f"gradient within {fastpath.GRAD_RTOL:.0e} of its norm".replace("e-0", "e-") in text
    assert f"up to {fastpath.proof.PROOF_TOKENS:,} tokens" in text


def test_training_records_the_fast_paths_and_saves_a_plain_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from t5qa.train import fit, setup
    from test_train import tiny_config

    run = setup(tiny_config(tiny_model_dir, tmp_path / "off", fast_dropout=False, fast_linear=False,
                            fast_norm=False))
    assert not any(isinstance(m, (fast_dropout.FastDropout, FastLinear)) for m in run.model.modules())
    assert not any(type(m).__name__.startswith("Fast") for m in run.model.modules())
    assert not {"dropout", "linear", "norm"} & set(run.summary["fast_paths"]["used"])

    result = fit(tiny_config(tiny_model_dir, tmp_path / "on", max_steps=2))
    summary = json.loads((tmp_path / "on" / "run" / "run_summary.json").read_text())
    used = set(summary["fast_paths"]["used"])
    assert {"dropout", "norm", "clip_in_step"} <= used and ("linear" in used) == onednn_linear_available()
    # what is saved is a plain model: no trace of t5qa's attention function in its config
    assert "t5qa" not in (result.output_dir / "last" / "config.json").read_text()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir / "last")
    assert reloaded.config._attn_implementation in ("sdpa", "eager")


def test_training_on_real_data_learns_the_same_with_and_without_fast_paths(tmp_path: Path) -> None:
    """The sample ML questions (real sentences, a vocabulary trained on them): 40 steps lower the training loss
    by the same amount, within the noise that different dropout masks make, with the fast paths on and off."""
    from t5qa.cli import main
    from t5qa.data import sample_data_path
    from t5qa.train import fit

    data = sample_data_path("en")
    assert main(["init-model", "--config", "tiny", "--tokenizer", str(data), "--vocab-size", "600",
                 "--output", str(tmp_path / "model")]) == 0
    config_file = tmp_path / "model" / "config.json"  # the preset trains without dropout; T5's default is 0.1
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dropout_rate": 0.1}))
    drops = {}
    for on in (True, False):
        cfg = load_train_config(None, model=str(tmp_path / "model"), train=str(data), val_fraction=0.0,
                                output=str(tmp_path / f"run-{on}"), train_batch_size=8, max_steps=40,
                                learning_rate=3e-3, log_every_steps=5, seed=3, max_source_tokens=256,
                                fast_dropout=on, fast_linear=on, fast_norm=on, keep_freed_memory=on)
        fit(cfg)
        losses = [json.loads(line)["loss"] for line in (tmp_path / f"run-{on}" / "metrics.jsonl").read_text()
                  .splitlines() if '"train"' in line]
        drops[on] = losses[0] - losses[-1]
        used = json.loads((tmp_path / f"run-{on}" / "run_summary.json").read_text())["fast_paths"]["used"]
        assert ("dropout" in used) == on
    assert drops[False] > 0.5, drops  # it learns
    assert abs(drops[True] - drops[False]) < 0.15 * drops[False], drops
