"""Measure levers on one t5-small training step, alternating variants in one process (ABAB...) so that load
from other jobs hits every variant alike. Prints one JSON object per lever with median seconds.

Levers: AdamW implementation (for-loop / foreach / fused), attention kernel (sdpa / eager), dropout on/off
(changes the model: informational), t5qa's fast dropout against PyTorch's, glibc keeping freed memory
(t5qa.fastpath.allocator.keep_freed_memory, switched on and off between rounds), torch.compile of the model; and three
parts of the fast dropout: the mask's conversion to float (bool against its uint8 view), drawing the random bits on
two threads instead of one, and sparse gradients for the tied embedding; and t5qa's FastLinear (oneDNN's fp32
product, `torch.ops.mkldnn._linear_pointwise`, for every linear layer's forward pass) against nn.Linear (MKL).

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
    parser.add_argument("--levers", default="optimizer,attention,dropout,fast_dropout,allocator,compile,"
                                            "mask_convert,rng_threads,tied_grads,onednn_linear")
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
        from t5qa.fastpath.dropout import enable as use_fast_dropout

        torch_dropout, fast, off = load(), load(), load(dropout_rate=0.0)
        use_fast_dropout(fast)
        res = median_time({"torch_dropout": train_step(torch_dropout), "t5qa_fast_dropout": train_step(fast),
                           "no_dropout": train_step(off)}, args.repeats)
        print(json.dumps({"lever": "forward+backward (s): dropout implementation", **res}), flush=True)
        del torch_dropout, fast, off

    if "allocator" in levers:
        import resource

        from t5qa.fastpath.allocator import _glibc, keep_freed_memory
        from t5qa.fastpath.dropout import enable as use_fast_dropout

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

    if "mask_convert" in levers:
        from t5qa.fastpath.dropout import _as_float, keep_mask

        x = torch.rand(8, 8, 300, 300)  # attention weights of 8 x 300 tokens: 5.8M elements
        mask = keep_mask(x.shape, 0.1)
        zero = x.new_zeros(())
        res = median_time({
            "bool_to_float": lambda: mask.to(x.dtype),
            "uint8_view_to_float": lambda: _as_float(mask, x.dtype),
            "apply_via_bool": lambda: torch.addcmul(zero, x, mask.to(x.dtype), value=1.1),
            "apply_via_uint8_view": lambda: torch.addcmul(zero, x, _as_float(mask, x.dtype), value=1.1),
        }, 10 * args.repeats)
        print(json.dumps({"lever": "mask conversion and apply, 5.8M elements (s)", **res}), flush=True)

    if "rng_threads" in levers:
        from concurrent.futures import ThreadPoolExecutor

        words = 8 * 8 * 300 * 300 // 4  # one 16-bit value per element, four per 64-bit word
        bits = torch.empty(words, dtype=torch.int64)
        pool = ThreadPoolExecutor(1)
        a, w = torch.randn(3000, 512), torch.randn(512, 2048)

        def one_thread() -> None:
            bits.random_(-(1 << 63), None)

        def two_threads() -> None:
            seeds = torch.empty(2, dtype=torch.int64).random_(-(1 << 63), None).tolist()
            half = words // 2
            gens = [torch.Generator(), torch.Generator()]
            for g, seed in zip(gens, seeds):
                g.manual_seed(seed)
            job = pool.submit(lambda: bits[half:].random_(-(1 << 63), None, generator=gens[1]))
            bits[:half].random_(-(1 << 63), None, generator=gens[0])
            job.result()

        res = median_time({"one_thread": one_thread, "two_threads": two_threads,
                           "matmul_then_one_thread": lambda: (a @ w, one_thread()),
                           "matmul_then_two_threads": lambda: (a @ w, two_threads()),
                           "matmul_alone": lambda: a @ w}, 10 * args.repeats)
        print(json.dumps({"lever": "random bits for a 5.8M-element mask (s); in a step a matmul runs just before",
                          **res}), flush=True)
        pool.shutdown()

    if "tied_grads" in levers:
        from t5qa.fastpath.dropout import enable as use_fast_dropout

        model = load()
        use_fast_dropout(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        tied = model.get_input_embeddings().weight
        # transformers 5 gives the encoder and decoder their own nn.Embedding modules sharing the weight
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is tied]

        def step_with(sparse: bool) -> Callable[[], None]:
            def fn() -> None:
                for module in embeddings:
                    module.sparse = sparse
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return fn

        from t5qa.fastpath.allocator import keep_freed_memory

        with keep_freed_memory():  # as fit() runs
            res = median_time({"dense": step_with(False), "sparse_lookup_gradients": step_with(True)},
                              args.repeats)
        print(json.dumps({"lever": "training step (s) by the tied embedding's lookup gradients, freed memory kept",
                          "embedding_modules": len(embeddings), **res}), flush=True)
        del model, optimizer

    if "onednn_linear" in levers:
        from t5qa.fastpath.dropout import enable as use_fast_dropout
        from t5qa.fastpath.linear import FastLinear, enable as use_fast_linear

        model = load()
        use_fast_dropout(model)
        use_fast_linear(model)
        linears = [m for m in model.modules() if isinstance(m, FastLinear)]

        def step_with(cls: type) -> Callable[[], None]:
            def fn() -> None:
                for module in linears:
                    module.__class__ = cls
                model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)
            return fn

        x, w = torch.randn(1600, 512), torch.randn(2048, 512)
        alone = median_time({"mkl_mm_alone": lambda: torch.nn.functional.linear(x, w),
                             "onednn_alone": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")},
                            10 * args.repeats)
        res = median_time({"mkl": step_with(torch.nn.Linear), "onednn_forward": step_with(FastLinear)},
                          args.repeats)
        print(json.dumps({"lever": "forward+backward (s) by the linear layers' forward matmul; and one 1600 x 512 "
                                   "x 2048 product alone", "linear_layers": len(linears), **res, **alone}),
              flush=True)
        del model

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
