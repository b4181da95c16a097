"""Measure levers on one t5-small training step, alternating variants in one process (ABAB...) so that load
from other jobs hits every variant alike. Prints one JSON object per lever with median seconds.

Levers: AdamW implementation (for-loop / foreach / fused), attention kernel (sdpa / eager), dropout on/off
(changes the model: informational), t5qa's fast dropout against PyTorch's, glibc keeping freed memory
(t5qa.fastpath.keep_freed_memory, switched on and off between rounds), torch.compile of the model.

    .venv/bin/python bench/experiments/train_levers.py --model-dir DIR [--source-tokens 160] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def median_time(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Run each fn once to warm up, then `repeats` rounds of all fns in turn; median seconds per fn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--source-tokens", type=int, default=160, help="source length of the fixed batch")
    parser.add_argument("--target-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--levers", default="optimizer,attention,dropout,fast_dropout,allocator,compile")
    args = parser.parse_args()
    common.set_threads()
    import torch
    from transformers import AutoModelForSeq2SeqLM

    levers = set(args.levers.split(","))
    torch.manual_seed(0)
    b, s, t = common.BATCH_SIZE, args.source_tokens, args.target_tokens
    batch = {"input_ids": torch.randint(5, 32000, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long),
             "labels": torch.randint(5, 32000, (b, t))}

    def load(**kw: Any) -> Any:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_dir, **kw)
        model.train()
        return model

    def train_step(model: Any) -> Callable[[], None]:
        def fn() -> None:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    if "optimizer" in levers:
        model = load()
        model(**batch).loss.backward()  # gradients to step on
        opts = {
            "adamw_for_loop": torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False),
            "adamw_foreach": torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True),
            "adamw_fused": torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True),
        }
        res = median_time({k: o.step for k, o in opts.items()}, args.repeats)
        clip = median_time({
            "clip_grad_norm_foreach": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True),
            "clip_grad_norm_loop": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False),
        }, args.repeats)
        print(json.dumps({"lever": "optimizer step (s)", **res, **clip}), flush=True)
        del model, opts

    if "attention" in levers:
        sdpa, eager = load(attn_implementation="sdpa"), load(attn_implementation="eager")
        res = median_time({"sdpa": train_step(sdpa), "eager": train_step(eager)}, args.repeats)
        print(json.dumps({"lever": "forward+backward (s) by attention kernel", **res}), flush=True)
        del sdpa, eager

    if "dropout" in levers:
        on, off = load(), load(dropout_rate=0.0)
        res = median_time({"dropout_0.1": train_step(on), "dropout_0": train_step(off)}, args.repeats)
        print(json.dumps({"lever": "forward+backward (s) by dropout (changes the model)", **res}), flush=True)
        del on, off

    if "fast_dropout" in levers:
        from t5qa.fastpath import use_fast_dropout

        torch_dropout, fast, off = load(), load(), load(dropout_rate=0.0)
        use_fast_dropout(fast)
        res = median_time({"torch_dropout": train_step(torch_dropout), "t5qa_fast_dropout": train_step(fast),
                           "no_dropout": train_step(off)}, args.repeats)
        print(json.dumps({"lever": "forward+backward (s): dropout implementation", **res}), flush=True)
        del torch_dropout, fast, off

    if "allocator" in levers:
        import resource

        from t5qa.fastpath import _glibc, keep_freed_memory, use_fast_dropout

        if _glibc() is None:
            print(json.dumps({"lever": "allocator", "skipped": "not glibc"}), flush=True)
        else:
            model = load()
            use_fast_dropout(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

            def full_step() -> None:
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            times: dict[str, list[float]] = {"glibc_default": [], "kept": []}
            faults: dict[str, list[int]] = {"glibc_default": [], "kept": []}
            full_step()
            for _ in range(args.repeats):
                for name in times:
                    with keep_freed_memory(name == "kept"):
                        full_step()  # settle the heap in this mode
                        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        start = time.perf_counter()
                        full_step()
                        times[name].append(time.perf_counter() - start)
                        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            print(json.dumps({"lever": "training step (s) and page faults by allocator setting",
                              **{k: statistics.median(v) for k, v in times.items()},
                              **{f"{k}_page_faults": statistics.median(v) for k, v in faults.items()}}), flush=True)
            del model, optimizer

    if "compile" in levers:
        eager_model = load()
        compiled_model = load()
        started = time.perf_counter()
        compiled = torch.compile(compiled_model)
        train_step(compiled)()  # compiles forward and backward for this shape
        compile_s = time.perf_counter() - started
        res = median_time({"eager": train_step(eager_model), "compiled": train_step(compiled)}, args.repeats)
        print(json.dumps({"lever": "forward+backward (s) with torch.compile", "compile_seconds": compile_s, **res}),
              flush=True)


if __name__ == "__main__":
    main()
