"""Where does t5qa's training step spend its time? torch.profiler over a few steps; writes bench/PROFILE.md.

Uses t5qa.train.setup() (the same model, optimizer, scheduler, sampler and collator that fit() uses) and runs
the body of fit()'s loop (forward, backward, gradient clipping, optimizer step, scheduler step) with each phase
labelled, so the report splits the step into phases and into kinds of operator.

    .venv/bin/python bench/profile_train.py --model-dir DIR   (bench/run.py makes DIR; or any saved t5-small)
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common

# aten operator -> kind; anything else is "other"
KINDS = {
    "matmul (mm, addmm, bmm, oneDNN linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                               "aten::_mkldnn", "mkldnn::_linear_pointwise", "aten::linear",
                                               "aten::matmul"),
    "attention (sdpa, softmax)": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax",
                                  "aten::softmax", "aten::_safe_softmax"),
    "elementwise (add, mul, relu, pow, rsqrt, mean)": ("aten::add", "aten::mul", "aten::relu", "aten::threshold",
                                                       "aten::pow", "aten::rsqrt", "aten::mean", "aten::div",
                                                       "aten::sub", "aten::neg", "aten::where", "aten::sum",
                                                       "aten::le", "aten::lt", "aten::clamp", "aten::sqrt"),
    "dropout (bernoulli, masks)": ("aten::bernoulli", "aten::native_dropout", "aten::dropout", "aten::empty_like",
                                   "aten::uniform_", "aten::random_", "aten::ge"),
    "optimizer (foreach / fused AdamW)": ("aten::_foreach", "aten::_fused_adamw"),
    "copies and layout (copy_, contiguous, cat, fill)": ("aten::copy_", "aten::clone", "aten::contiguous",
                                                         "aten::cat", "aten::fill_", "aten::zero_", "aten::zeros",
                                                         "aten::to", "aten::_to_copy", "aten::expand",
                                                         "aten::index", "aten::embedding", "aten::masked_fill"),
    "loss (log_softmax, nll)": ("aten::_log_softmax", "aten::nll_loss", "aten::log_softmax",
                                "aten::cross_entropy"),
}
PHASES = ("data", "forward", "backward", "clip_grad_norm", "optimizer_step", "zero_grad_and_scheduler")


def kind_of(op: str) -> str:
    for kind, prefixes in KINDS.items():
        if op.startswith(prefixes):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--steps", type=int, default=6, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=12, help="steps before any are counted")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "PROFILE.md"))
    parser.add_argument("--out", default=None, help="result JSON path (bench/run.py)")
    parser.add_argument("--trace", default=None, help="also write a Chrome trace here")
    args = parser.parse_args()

    common.set_threads()
    logging.basicConfig(level=logging.WARNING)
    from torch.profiler import ProfilerActivity, profile, record_function

    from t5qa.config import EncodeConfig, TrainConfig
    from t5qa.fastpath.allocator import keep_freed_memory
    from t5qa.train import setup

    # as fit() does
    keeping = keep_freed_memory(True)
    keeping.__enter__()

    with tempfile.TemporaryDirectory(prefix="t5qa-profile-") as tmp:
        cfg = TrainConfig(model=args.model_dir, train=str(common.TRAIN_FILE), output=str(Path(tmp) / "run"),
                          encode=EncodeConfig(max_source_tokens=common.MAX_SOURCE_TOKENS,
                                              max_target_tokens=common.MAX_TARGET_TOKENS),
                          train_batch_size=common.BATCH_SIZE, learning_rate=common.LEARNING_RATE,
                          max_steps=args.warmup + 2 * args.steps)
        run = setup(cfg)
    model, optimizer, scheduler, accelerator = run.model, run.optimizer, run.scheduler, run.accelerator
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = iter(run.train_loader)

    def step(tokens: list[int]) -> None:
        with record_function("data"):
            batch = next(batches)
            batch.pop("example_index", None)
        tokens.append(int(batch["attention_mask"].sum()))
        with record_function("forward"):
            loss = model(**batch).loss
        with record_function("backward"):
            accelerator.backward(loss)
        with record_function("clip_grad_norm"):
            # as fit(): inside fused AdamW's step where it can be
            run.fast.limit_gradient_norm(accelerator, model, trainable, run.cfg.max_grad_norm)
        with record_function("optimizer_step"):
            optimizer.step()
        with record_function("zero_grad_and_scheduler"):
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss.item()

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    warm: list[int] = []
    for _ in range(args.warmup):  # the heap grows to the largest batches seen; steps after fault far less
        step(warm)
    # the same number of steps without the profiler, for their page faults (median: a step with a batch longer
    # than any before still grows the heap)
    unprofiled_faults, profiled_faults = [], []
    for _ in range(args.steps):
        before = faults()
        step(warm)
        unprofiled_faults.append(faults() - before)
    tokens: list[int] = []
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.steps):
            before = faults()
            step(tokens)
            profiled_faults.append(faults() - before)
    wall = time.perf_counter() - started
    if args.trace:
        prof.export_chrome_trace(args.trace)

    events = prof.key_averages()
    phase_us = {p: 0.0 for p in PHASES}
    kind_us: dict[str, float] = defaultdict(float)
    op_us: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key in phase_us:
            phase_us[e.key] += e.cpu_time_total
        elif e.key.startswith("aten::") or e.key.startswith("mkldnn"):
            op_us[e.key] += e.self_cpu_time_total
            kind_us[kind_of(e.key)] += e.self_cpu_time_total
    total_phase = sum(phase_us.values()) or 1.0
    total_ops = sum(op_us.values()) or 1.0
    n = args.steps
    lines = [
        "# Profile of the t5qa training step",
        "",
        f"torch.profiler (CPU) over {n} steps of t5qa.train.setup()'s model/optimizer/loader (fit()'s loop body), "
        f"batch {common.BATCH_SIZE}, {common.THREADS} threads, {sum(tokens) / (n * common.BATCH_SIZE):.0f} real source "
        f"tokens per example on average; {wall / n:.2f} s per step with the profiler on "
        f"({time.strftime('%Y-%m-%d %H:%M')}), after {args.warmup} warm-up steps.",
        "",
        f"Page faults per step (median): {statistics.median(unprofiled_faults):,.0f} without the profiler, "
        f"{statistics.median(profiled_faults):,.0f} under it. 16,000 faults are one 64 MiB block (the tied "
        "embedding's gradient, and the buffers that build it) mapped afresh: most likely the profiler's own "
        "buffers take the heap space that `fit()` keeps. Where the two counts differ by tens of thousands, "
        "`fill_`, `add` and `copy_` below are inflated by those faults.",
        "",
        "| phase | ms per step | share |",
        "|---|---|---|",
    ]
    for p in PHASES:
        lines.append(f"| {p} | {phase_us[p] / 1e3 / n:.0f} | {100 * phase_us[p] / total_phase:.1f}% |")
    lines += ["", "| kind of operator (self CPU time) | ms per step | share |", "|---|---|---|"]
    for kind, us in sorted(kind_us.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / 1e3 / n:.0f} | {100 * us / total_ops:.1f}% |")
    lines += ["", "| top operators (self CPU time) | ms per step | share |", "|---|---|---|"]
    for op, us in sorted(op_us.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"| `{op}` | {us / 1e3 / n:.1f} | {100 * us / total_ops:.1f}% |")
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if args.out:
        common.write_result(args.out, {"name": "profile", "kind": "profile", "phase_ms_per_step":
                                       {p: phase_us[p] / 1e3 / n for p in PHASES},
                                       "kind_share": {k: v / total_ops for k, v in kind_us.items()},
                                       "seconds_per_step": wall / n,
                                       "page_faults_per_step": {"unprofiled": statistics.median(unprofiled_faults),
                                                                "profiled": statistics.median(profiled_faults)}})


if __name__ == "__main__":
    main()
