"""GPU benchmark (run through bench/gpu.sh): t5-base shapes in bf16 on one GPU, in about 8 minutes.

Measures, each in its own process on the same card, model (t5-base shapes, random weights, the real T5 tokenizer)
and data (TyDi QA GoldP English from ../shared/data):
  - training samples/s: `t5qa train` (precision bf16) against Seq2SeqTrainer with its best GPU flags (bf16, tf32,
    fused AdamW, length-grouped sampling, SDPA attention, dynamic padding), two epochs over the same fixed subset
    with the second one timed (as bench/run.py times them on the CPU);
  - answering questions/s: t5qa's Predictor against `model.generate` on batches of 16, both with the model in bf16,
    16 forced new tokens;
  - the peak GPU memory of each (torch.cuda.max_memory_allocated), and model FLOP utilisation: useful FLOPs (real
    tokens only, bench/flops.py) per second against the card's dense bf16 peak (PEAK_BF16_TFLOPS, or --peak-tflops).
Writes bench/GPU_RESULTS.md (and the raw figures beside it as gpu_results.json).

    bash bench/gpu.sh              # on a machine with a CUDA GPU
    bash bench/gpu.sh --dry-run    # anywhere: the same pipeline on the CPU, a tiny T5 in fp32, a few steps

The dry run checks the script itself (CI runs it): its report is marked as a dry run and goes to a temporary
directory unless --output is given; it never replaces bench/GPU_RESULTS.md. Sequence packing (several short
examples per row) is the lever this benchmark exists to measure next; t5qa does not pack yet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from run import run_worker

HERE = Path(__file__).resolve().parent
# Dense bf16 peaks (tensor cores, no sparsity), TFLOP/s, from the vendors' data sheets; matched in the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0}


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, by the longest matching name in PEAK_BF16_TFLOPS."""
    matches = [name for name in PEAK_BF16_TFLOPS if name in device_name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def plan(dry_run: bool) -> dict[str, Any]:
    """What runs: the real sizes, or the dry run's tiny ones."""
    if dry_run:
        return {"preset": "tiny", "steps": 2, "batch_size": 4, "questions": 8, "device": "cpu", "dtype": "float32",
                "gpu_flags": False}
    return {"preset": "t5-base", "steps": 30, "batch_size": 32, "questions": 320, "device": "cuda",
            "dtype": "bfloat16", "gpu_flags": True}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every measurement, each in its own process; their results by name."""
    setting = plan(args.dry_run)
    if args.steps:
        setting["steps"] = args.steps
    model_dir = work / "model"
    made = run_worker("make_model.py", ["--output", str(model_dir), "--preset", setting["preset"]],
                      work / "make_model.json", args.timeout)
    results: dict[str, Any] = {"setting": setting, "made": made}
    if "error" in made:
        return results
    steps, batch = setting["steps"], setting["batch_size"]
    train_args = ["--model-dir", str(model_dir), "--warmup-steps", str(steps), "--steps", str(steps),
                  "--examples", str(steps * batch), "--batch-size", str(batch)]
    train_args += ["--gpu"] if setting["gpu_flags"] else []
    for impl in ("trainer-best", "t5qa"):
        results[impl] = run_worker("bench_train.py", ["--impl", impl, *train_args], work / f"{impl}.json",
                                   args.timeout)
    predict_args = ["--model-dir", str(model_dir), "--questions", str(setting["questions"]),
                    "--device", setting["device"], "--dtype", setting["dtype"]]
    for impl in ("generate-16", "t5qa-torch"):
        results[impl] = run_worker("bench_predict.py", ["--impl", impl, *predict_args], work / f"{impl}.json",
                                   args.timeout)
    return results


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if "error" in a or "error" in b or not b.get(key):
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


def _table(results: dict[str, Any], names: tuple[str, ...], cells: Any, header: tuple[str, ...]) -> list[str]:
    """Markdown rows: one per implementation, its error in the first cell where it failed."""
    lines = ["| implementation | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name in names:
        r = results[name]
        row = [r["error"], *[""] * (len(header) - 1)] if "error" in r else cells(r)
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def _memory(r: dict[str, Any]) -> str:
    return f"{r['peak_gpu_memory_mb']:.0f}" if "peak_gpu_memory_mb" in r else "n/a (CPU)"


def write_report(path: Path, results: dict[str, Any], argv: list[str], dry_run: bool,
                 peak_override: float | None) -> None:
    setting = results["setting"]
    device = next((r.get("device_name") for r in results.values() if isinstance(r, dict) and r.get("device_name")),
                  None) or "CPU (dry run)"
    peak = peak_override or (peak_tflops(device) if not dry_run else None)
    lines = ["# GPU benchmark" + (" (DRY RUN on the CPU: checks the script; these are not GPU figures)" if dry_run
                                  else ""), ""]
    lines += [f"- command: `bash bench/gpu.sh {' '.join(argv)}`".rstrip(),
              f"- date: {time.strftime('%Y-%m-%d')}, device: {device}, dense bf16 peak: "
              f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}",
              f"- model: {setting['preset']} shapes, random weights, the real T5 tokenizer; {setting['dtype']}; "
              f"batch {setting['batch_size']}, {setting['steps']} timed steps after {setting['steps']} warm-up "
              "steps (two epochs over the same subset, the second timed)", ""]
    if "error" in results["made"]:
        lines += [f"The model could not be made: {results['made']['error']}", ""]
        path.write_text("\n".join(lines), encoding="utf-8")
        return
    def train_cells(r: dict[str, Any]) -> list[str]:
        rate = r["useful_flop_per_second"] / 1e12
        return [f"{r['samples_per_second']:.2f}", _ratio(results["t5qa"], r, "samples_per_second"), f"{rate:.2f}",
                f"{100 * rate / peak:.1f}%" if peak else "n/a", _memory(r)]

    def predict_cells(r: dict[str, Any]) -> list[str]:
        return [f"{r['questions_per_second']:.2f}", _ratio(results["t5qa-torch"], r, "questions_per_second"),
                _memory(r)]

    lines += ["## Training", ""]
    lines += _table(results, ("trainer-best", "t5qa"), train_cells,
                    ("samples/s", "t5qa vs this", "useful TFLOP/s", "MFU", "peak GPU MiB"))
    lines += ["", "trainer-best: Seq2SeqTrainer with bf16, tf32, adamw_torch_fused, group_by_length and SDPA "
              "attention; t5qa: `t5qa train` with precision bf16" + (" (the dry run: both without the GPU flags, "
                                                                      "in fp32)." if dry_run else "."),
              "", "## Answering", ""]
    lines += _table(results, ("generate-16", "t5qa-torch"), predict_cells,
                    ("questions/s", "t5qa vs this", "peak GPU MiB"))
    lines += ["", f"The first {setting['questions']} TyDi QA dev questions, 16 forced new tokens, greedy.", "",
              "Not measured yet: sequence packing for training (t5qa does not pack yet).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same pipeline on the CPU with a tiny model")
    parser.add_argument("--output", default=None, help="report path (default: bench/GPU_RESULTS.md; for a dry run, "
                        "a temporary directory)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (and as many warm-up steps)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, TFLOP/s")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per benchmark process")
    args = parser.parse_args(argv)
    missing = common.shared_data_missing()
    if missing:
        print(f"gpu benchmark skipped: {missing}")
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu benchmark: no CUDA GPU here; run it on a machine with one, or check the script on the CPU "
                  "with --dry-run", file=sys.stderr)
            return 2
    output = Path(args.output) if args.output else (
        Path(tempfile.mkdtemp(prefix="t5qa-gpu-dry-run-")) / "GPU_RESULTS.md" if args.dry_run
        else HERE / "GPU_RESULTS.md")
    work = Path(tempfile.mkdtemp(prefix="t5qa-gpu-bench-"))
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_report(output, results, argv, args.dry_run, args.peak_tflops)
    output.with_name("gpu_results.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "answers"} if isinstance(v, dict) else v
         for k, v in results.items()}, indent=2), encoding="utf-8")
    print(f"gpu benchmark: report in {output}")
    failed = [name for name, r in results.items() if isinstance(r, dict) and "error" in r]
    if failed:
        print(f"gpu benchmark: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
