"""Run every t5qa benchmark against its peers, one process at a time, and write bench/RESULTS.md.

    .venv/bin/python bench/run.py --quick     # a few minutes on a quiet 2-core machine: checks the harness
    .venv/bin/python bench/run.py             # the full run (about 20-30 minutes on 2 cores)

Each benchmark runs in its own subprocess, sequentially, so they never compete for the cores and each peak
RSS is that benchmark's own. The machine is shared, so the report gives ratios measured in the same run, and
beside each figure the CPU seconds the process got per wall second (2.0 = both cores all the time).
The script reports; it does not assert: it exits 0 when a target is missed, and when ../shared/data is absent
it says so and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

TRAIN_IMPLS = ("trainer-best", "t5qa", "trainer-compile", "trainer-default", "plain-512")
PREDICT_IMPLS = ("generate-16", "t5qa-torch", "t5qa-ct2-int8", "t5qa-ct2-float32", "generate-1")
# Implementations whose batches all have the same shape (everything padded to a fixed length): their step time
# does not depend on which examples are drawn, so fewer timed steps give an unbiased rate.
FIXED_SHAPE = ("trainer-default", "plain-512")


@dataclass(frozen=True)
class Mode:
    name: str
    warmup_steps: int
    timed_steps: int          # for dynamically padded loops (t5qa, trainer-best)
    timed_steps_fixed: int    # for loops that pad every batch to the same shape
    questions: int
    profile: bool
    rounds: int               # trainer-best and t5qa alternate this many times, timed_steps / rounds each
    serve_args: tuple[str, ...]       # bench/serve_throughput.py's sizing
    load_requests: int                # bench/load_test.py: requests from 32 clients
    train_eval_args: tuple[str, ...]  # bench/bench_train_eval.py's sizing (steps, evaluations, questions)


QUICK = Mode("quick", warmup_steps=1, timed_steps=4, timed_steps_fixed=2, questions=16, profile=False, rounds=1,
             serve_args=("--quick",), load_requests=200,
             train_eval_args=("--steps", "4", "--evals", "2", "--questions", "8"))
# The dynamically padded loops (trainer-best, t5qa) each train two epochs over the same fixed random subset of
# (timed steps per round) x batch examples: the first epoch warms up, the second is timed. So both are timed on
# exactly the same examples and only the batching differs. (Timing all but the first few steps of one epoch is
# not fair: the Trainer's length-grouped sampler puts its longest batch first in every epoch, so its warm-up took
# its two longest batches, 347 and 251 source tokens per example against 162 for the whole subset.) They alternate
# (trainer-best, t5qa, trainer-best, t5qa), so a slow patch of the shared machine hits both; each figure sums the
# rounds. `warmup_steps` applies to the fixed-shape loops only.
FULL = Mode("full", warmup_steps=2, timed_steps=80, timed_steps_fixed=10, questions=440, profile=True, rounds=2,
            serve_args=(), load_requests=2000,
            train_eval_args=("--steps", "40", "--evals", "2", "--questions", "96"))
# trainer-default joins the rounds too (its own fixed-shape step count per round, on the whole training file):
# run once, its figure followed the machine's state of that one minute.
ALTERNATING = ("trainer-best", "t5qa", "trainer-compile", "trainer-default")

TARGETS = {
    "train_vs_trainer_best": 1.3,
    "train_vs_trainer_default": 3.0,
    "mfu": 0.5,
    # issue 18's round-two targets (the first round's were 1.5x and 3x)
    "predict_torch_vs_generate16": 2.5,
    "predict_ct2_int8_vs_generate16": 5.0,
    "serve_batched_vs_one_by_one": 3.0,  # requests/s with 16 concurrent clients
    "load_5xx": 0,  # server errors under load_requests requests from 32 clients
}
TRAIN_EVAL_IMPLS = ("trainer", "t5qa")  # bench_train_eval.py: Seq2SeqTrainer with predict_with_generate, t5qa


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_worker(script: str, args: list[str], out: Path, timeout_s: int, *,
               failing_exit_keeps_result: bool = False) -> dict[str, Any]:
    """Run one benchmark process; its result dict, or {"error": ...} when it failed. With
    `failing_exit_keeps_result`, a process that exits non-zero after writing its result (load_test.py does when a
    request failed) keeps that result, with its exit status."""
    command = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    shown = " ".join(["python", f"bench/{script}", *args])
    print(f"[bench] {shown}", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, env=worker_env(), cwd=common.REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s", "command": shown}
    wall = time.perf_counter() - started
    if proc.returncode != 0 and failing_exit_keeps_result and out.is_file():
        result = json.loads(out.read_text(encoding="utf-8"))
        result.update({"command": shown, "process_seconds": wall, "exit_status": proc.returncode})
        print(f"[bench]   done in {wall:.0f} s (exit status {proc.returncode})", flush=True)
        return result
    if proc.returncode != 0 or not out.is_file():
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        if "No module named 't5qa" in proc.stderr:
            tail = ["t5qa: not available (" + tail[0] + ")"]
        print(f"[bench]   failed: {tail[0]}", flush=True)
        (out.with_suffix(".stderr.txt")).write_text(proc.stderr, encoding="utf-8")
        return {"error": tail[0], "command": shown, "process_seconds": wall}
    result = json.loads(out.read_text(encoding="utf-8"))
    result["command"] = shown
    result["process_seconds"] = wall
    print(f"[bench]   done in {wall:.0f} s", flush=True)
    return result


def _per_round(r: dict[str, Any]) -> str:
    rates = r.get("samples_per_second_per_round")
    return f" ({', '.join(f'{x:.2f}' for x in rates)} samples/s)" if rates and len(rates) > 1 else ""


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One training figure from several rounds of the same implementation: totals over all timed steps."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    seconds = sum(r["seconds"] for r in rounds)
    cpu_seconds = sum(r["cpu_seconds"] for r in rounds)
    samples = sum(r["samples"] for r in rounds)
    flop = sum(r["useful_flop_per_second"] * r["seconds"] for r in rounds)
    combined = dict(rounds[-1])
    combined.pop("command", None)  # each round lists its own command
    combined.update({
        "rounds": len(rounds),
        "timed_steps": sum(r["timed_steps"] for r in rounds),
        "seconds": seconds,
        "samples": samples,
        "samples_per_second": samples / seconds,
        "real_source_tokens_per_example": sum(r["real_source_tokens_per_example"] * r["samples"] for r in rounds) / samples,
        "real_target_tokens_per_example": sum(r["real_target_tokens_per_example"] * r["samples"] for r in rounds) / samples,
        "useful_flop_per_second": flop / seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_per_wall": cpu_seconds / seconds,
        "samples_per_cpu_second": samples / cpu_seconds,
        "useful_flop_per_cpu_second": flop / cpu_seconds,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
        "samples_per_second_per_round": [r["samples_per_second"] for r in rounds],
    })
    return combined


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if "error" in a or "error" in b or not b.get(key) or a.get(key) is None:
        return None
    return a[key] / b[key]


def verdict(value: float | None, target: float, *, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a (a benchmark did not run)"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "PASS"
    if higher_is_better:
        return f"MISS (by {100 * (target - value) / target:.0f}%: {value:.2f} vs {target:.2f})"
    return f"MISS (by {100 * (value - target) / target:.0f}%: {value:.2f} vs {target:.2f})"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def agreement(a: dict[str, Any], b: dict[str, Any]) -> str:
    if "answers" not in a or "answers" not in b:
        return "–"
    same = sum(x == y for x, y in zip(a["answers"], b["answers"]))
    return f"{same}/{len(a['answers'])}"


def write_report(path: Path, mode: Mode, results: dict[str, dict[str, Any]], argv: list[str],
                 started: datetime.datetime, wall_s: float) -> None:
    mm0, mm1 = results.get("matmul-start", {}), results.get("matmul-end", {})
    peak = max((m.get("flop_per_second", 0.0) for m in (mm0, mm1)), default=0.0) or None
    lines: list[str] = []
    add = lines.append
    versions = results.get("versions", {})
    add("# t5qa benchmark results")
    add("")
    add(f"- date: {started:%Y-%m-%d %H:%M} (UTC{started:%z}), mode: **{mode.name}**, total wall time {wall_s / 60:.1f} min")
    add(f"- machine: {common.cpu_name()}, {os.cpu_count()} logical CPUs; benchmarks use {common.THREADS} threads; "
        f"load average at start {results.get('load_start', 0):.1f}, at end {os.getloadavg()[0]:.1f} "
        "(other jobs share this machine: read ratios, not absolute times)")
    add("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    add(f"- command: `python bench/{' '.join(['run.py', *argv])}`")
    add(f"- setting: t5-small shapes, random init, real T5 tokenizer; TyDi QA GoldP English; fp32; batch "
        f"{common.BATCH_SIZE}; source <= {common.MAX_SOURCE_TOKENS} tokens, target <= {common.MAX_TARGET_TOKENS}; "
        f"greedy, exactly {common.NEW_TOKENS} new tokens per answer")
    made = results.get("make_model", {})
    add(f"- model: made by {made.get('made_by', '?')}; CTranslate2 exports by {made.get('ct2_int8_by', '?')}")
    if mode.name == "quick":
        add("- **quick mode: a handful of steps and questions; ratios are indicative only.** With so few steps "
            "the Trainer's group_by_length sampler is timed on the longest batches of its first length group "
            "(it puts them first), which understates its rate; run the full mode for figures to quote.")
    add("")

    add("## Targets")
    add("")
    train, pred = {k: results.get(k, {"error": "not run"}) for k in TRAIN_IMPLS}, {
        k: results.get(k, {"error": "not run"}) for k in PREDICT_IMPLS}
    t5 = train["t5qa"]
    peak_cpu = max((m.get("flop_per_cpu_second", 0.0) for m in (mm0, mm1)), default=0.0) or None
    ok = "error" not in t5
    mfu = t5["useful_flop_per_second"] / peak if ok and peak else None
    mfu_cpu = t5["useful_flop_per_cpu_second"] / peak_cpu if ok and peak_cpu else None
    rss_ratio = (t5["peak_rss_mb"] / train["trainer-best"]["peak_rss_mb"]
                 if ok and "error" not in train["trainer-best"] else None)
    rows = [
        ("training samples/s, t5qa / Trainer best flags", ratio(t5, train["trainer-best"], "samples_per_second"),
         ratio(t5, train["trainer-best"], "samples_per_cpu_second"), TARGETS["train_vs_trainer_best"], True, "x"),
        ("training samples/s, t5qa / Trainer defaults", ratio(t5, train["trainer-default"], "samples_per_second"),
         ratio(t5, train["trainer-default"], "samples_per_cpu_second"), TARGETS["train_vs_trainer_default"], True,
         "x"),
        ("training model FLOP utilisation (useful FLOP/s / matmul FLOP/s)", mfu, mfu_cpu, TARGETS["mfu"], True, "%"),
        ("prediction questions/s, t5qa torch / generate batch 16",
         ratio(pred["t5qa-torch"], pred["generate-16"], "questions_per_second"),
         ratio(pred["t5qa-torch"], pred["generate-16"], "questions_per_cpu_second"),
         TARGETS["predict_torch_vs_generate16"], True, "x"),
        ("prediction questions/s, t5qa CTranslate2 int8 / generate batch 16",
         ratio(pred["t5qa-ct2-int8"], pred["generate-16"], "questions_per_second"),
         ratio(pred["t5qa-ct2-int8"], pred["generate-16"], "questions_per_cpu_second"),
         TARGETS["predict_ct2_int8_vs_generate16"], True, "x"),
        ("training peak RSS, t5qa / Trainer best flags", rss_ratio, None, 1.0, False, "x"),
    ]

    def shown(value: float | None, unit: str) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x"

    serve, load = results.get("serve", {"error": "not run"}), results.get("load", {"error": "not run"})
    rows.append(("server requests/s, 16 concurrent clients, micro-batching / one request per model call",
                 serve.get("ratio_batched_vs_one_by_one"), None, TARGETS["serve_batched_vs_one_by_one"], True, "x"))

    add("| target | measured (wall time) | verdict | same ratio per CPU-second | verdict | required |")
    add("|---|---|---|---|---|---|")
    for name, value, cpu_value, target, higher, unit in rows:
        need = (f">= {100 * target:.0f}%" if unit == "%" else (f">= {target}x" if higher else f"<= {target}x"))
        cpu_verdict = verdict(cpu_value, target, higher_is_better=higher) if cpu_value is not None else "–"
        add(f"| {name} | {shown(value, unit)} | {verdict(value, target, higher_is_better=higher)} | "
            f"{shown(cpu_value, unit)} | {cpu_verdict} | {need} |")
    if "error" in load:
        add(f"| server 5xx under load | {load['error']} | n/a (a benchmark did not run) | – | – | 0 |")
    else:
        failed = load["server_errors_5xx"] + load["dropped"]
        add(f"| server 5xx and dropped requests, {load['requests']} requests from {load['concurrency']} clients | "
            f"{load['server_errors_5xx']} 5xx, {load['dropped']} dropped, {load['client_errors_4xx']} 4xx | "
            f"{'PASS' if failed == 0 else 'MISS'} | – | – | 0 |")
    t5_eval, trainer_eval = (results.get(f"train-eval-{i}", {"error": "not run"}) for i in ("t5qa", "trainer"))
    add(f"| training run with evaluation, t5qa / Seq2SeqTrainer with predict_with_generate (total seconds) | "
        f"{shown(ratio(trainer_eval, t5_eval, 'seconds'), 'x')} | reported | – | – | – |")
    add("")
    add("The targets are defined on wall time. When other jobs take cores, a process gets less than "
        f"{common.THREADS} CPU-seconds per second (column *CPU s per wall s* below) and wall-time ratios between "
        "processes run minutes apart say more about the load than about the tools; the CPU-time ratios divide "
        "that out (busy-waiting threads still count as CPU time, so they are not exact either).")
    add("")

    add("## Machine: fp32 matmul rate (square matrices, best of several, best of torch.matmul (MKL) and oneDNN's "
        "linear)")
    add("")
    for label, mm in (("start of run", mm0), ("end of run", mm1)):
        if "error" in mm or not mm:
            add(f"- {label}: {mm.get('error', 'not run')}")
        else:
            sizes = ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in mm["per_size"].items())
            libraries = "".join(f"; {lib} best {max(v.values()) / 1e9:.0f}"
                                for lib, v in mm.get("per_library", {}).items())
            add(f"- {label}: **{mm['flop_per_second'] / 1e9:.1f} GFLOP/s** (per size, GFLOP/s: {sizes}{libraries}); "
                f"{mm.get('flop_per_cpu_second', 0) / 1e9:.1f} GFLOP per CPU-second")
    add(f"- MFU below divides by the better of the two: {fmt(peak / 1e9 if peak else None, 1)} GFLOP/s")
    add("")

    add("## Training (samples/s over the timed steps, after warm-up)")
    add("")
    add("| implementation | samples/s | t5qa vs this | samples per CPU-s | t5qa vs this (CPU) | timed steps | "
        "real source / target tokens per example | useful GFLOP/s | MFU | CPU s per wall s | peak RSS (MiB) |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in TRAIN_IMPLS:
        r = train[name]
        if "error" in r:
            add(f"| {name} | {r['error']} | | | | | | | | | |")
            continue
        rel = ratio(t5, r, "samples_per_second")
        rel_cpu = ratio(t5, r, "samples_per_cpu_second")
        add(f"| {name} | {r['samples_per_second']:.3f} | {fmt(rel)}x | {r['samples_per_cpu_second']:.3f} | "
            f"{fmt(rel_cpu)}x | {r['timed_steps']}{_per_round(r)} | "
            f"{r['real_source_tokens_per_example']:.0f} / {r['real_target_tokens_per_example']:.1f} | "
            f"{r['useful_flop_per_second'] / 1e9:.1f} | {fmt(100 * r['useful_flop_per_second'] / peak if peak else None, 0)}% | "
            f"{r['cpu_per_wall']:.2f} | {r['peak_rss_mb']:.0f} |")
    add("")
    add(f"trainer-best, trainer-compile (trainer-best with torch_compile=True) and t5qa each train two epochs "
        f"over the same {results.get('train_examples', '?')} "
        "examples (a fixed random subset of the training file) per round: the first epoch warms up, the second is "
        "timed, so both are timed on exactly the same examples (the Trainer's length-grouped sampler puts its "
        "longest batch first in every epoch, so a warm-up of a few steps would take its longest batches out of "
        "its timing; compiling falls in the first epoch too). trainer-default (fixed shapes) trains on the whole "
        "file. The four alternate round by round, and their figures total the rounds (samples/s of each round in "
        "brackets).")
    add("")
    add("*t5qa vs this* is t5qa's samples/s divided by this row's. Useful FLOPs count only real (non-padding) tokens "
        "(bench/flops.py; it matches torch.utils.flop_counter exactly on T5), so padding earns no credit. "
        "trainer-default and plain-512 pad every batch to one shape, so their step time does not depend on the "
        "examples drawn and fewer timed steps suffice.")
    add("")

    add("## Prediction (questions/s, same first N dev questions, exactly 16 new tokens each)")
    add("")
    add("| implementation | questions | questions/s | t5qa torch vs this | questions per CPU-s | "
        "t5qa torch vs this (CPU) | model inputs | CPU s per wall s | peak RSS (MiB) | same answers as generate-16 |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    base = pred["generate-16"]
    for name in PREDICT_IMPLS:
        r = pred[name]
        if "error" in r:
            add(f"| {name} | {r['error']} | | | | | | | | |")
            continue
        rel = ratio(pred["t5qa-torch"], r, "questions_per_second")
        rel_cpu = ratio(pred["t5qa-torch"], r, "questions_per_cpu_second")
        add(f"| {name} | {r['questions']} | {r['questions_per_second']:.3f} | {fmt(rel)}x | "
            f"{r['questions_per_cpu_second']:.3f} | {fmt(rel_cpu)}x | "
            f"{r.get('model_inputs', r['questions'])} | {r['cpu_per_wall']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{agreement(r, base)} |")
    add("")
    add("*model inputs* exceeds *questions* when t5qa cuts a context longer than 384 tokens into windows (the "
        "peers truncate it instead, and may lose the answer). A random model's greedy output is mostly padding "
        "tokens, so the answer texts are often empty; the agreement column checks that the backends decode the "
        "same tokens (int8 may differ).")
    add("")

    add("## Server (requests/s and client-side latency; `t5qa serve` in its own process)")
    add("")
    if "error" in serve:
        add(f"Not measured: {serve['error']}")
    else:
        add(f"bench/serve_throughput.py: {serve['model']}; TyDi QA dev questions in file order, exactly "
            f"{common.NEW_TOKENS} new tokens per answer; the batched server runs with --max-batch-size "
            f"{serve['max_batch_size']} --max-wait-ms {serve['max_wait_ms']:g} (its defaults).")
        add("")
        add("| scenario | concurrent clients | requests | requests/s | p50 latency ms | p99 latency ms | model calls | "
            "mean pairs per call |")
        add("|---|---|---|---|---|---|---|---|")
        for name, r in serve["scenarios"].items():
            clients = 1 if name == "sequential" else serve["concurrency"]
            add(f"| {name} | {clients} | {r['requests']} | {r['requests_per_second']:.2f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {r['model_calls']} | {r['mean_batch']:.1f} |")
        add("")
        add("`batched` is the server as users run it; `one-by-one` is the same server with --max-batch-size 1 (the "
            "same concurrent requests, one per model call); `sequential` is one client waiting for each answer "
            "(the latency a lone user sees).")
    add("")
    if "error" not in load:
        lat = load.get("latency_ms", {})
        add(f"Load (bench/load_test.py, the {load.get('preset', '?')} preset, {load.get('max_new_tokens', '?')} new "
            f"tokens): {load['requests']} requests from {load['concurrency']} clients, {load['ok']} answered, "
            f"{load['server_errors_5xx']} 5xx, {load['client_errors_4xx']} 4xx, {load['dropped']} dropped; "
            f"{load['requests_per_second']:.1f} requests/s, p99 {lat.get('p99', float('nan')):.0f} ms, "
            f"{load.get('server_batches', '?')} model calls.")
        add("")

    add("## A training run with evaluation (t5qa against Seq2SeqTrainer with predict_with_generate)")
    add("")
    if "error" in t5_eval or "error" in trainer_eval:
        add(f"Not measured: {t5_eval.get('error') or trainer_eval.get('error')}")
    else:
        add(f"bench/bench_train_eval.py: each trains {t5_eval['steps']} steps of batch {common.BATCH_SIZE} and "
            f"evaluates {t5_eval['evaluations']} times (loss, and greedy answers of exactly {common.NEW_TOKENS} new "
            "tokens) on the first TyDi QA dev questions; seconds from the end of the first step to the end of the "
            "last evaluation.")
        add("")
        add("| tool | total s | training s | evaluation s | t5qa faster by (total / evaluation) | peak RSS (MiB) |")
        add("|---|---|---|---|---|---|")
        for name, r in (("trainer", trainer_eval), ("t5qa", t5_eval)):
            add(f"| {name} | {r['seconds']:.1f} | {r['train_seconds']:.1f} | {r['eval_seconds']:.1f} | "
                f"{r['seconds'] / t5_eval['seconds']:.2f}x / {r['eval_seconds'] / t5_eval['eval_seconds']:.2f}x | "
                f"{r['peak_rss_mb']:,.0f} |")
        refused = t5_eval.get("answering_fast_paths_refused") or []
        add("")
        add("t5qa's evaluations answered with every answering fast path (the lean decoding loop included)."
            if not refused else "t5qa's answering fast paths refused: " + "; ".join(refused))
    add("")

    profile = HERE / "PROFILE.md"
    add("## Where the t5qa training step spends its time")
    add("")
    if profile.is_file():
        add(profile.read_text(encoding="utf-8").strip().split("\n", 1)[1].strip())
    else:
        add("Not profiled yet: run `python bench/profile_train.py` (writes bench/PROFILE.md).")
    add("")

    levers = HERE / "experiments" / "LEVERS.md"
    if levers.is_file():
        add("## " + levers.read_text(encoding="utf-8").strip().lstrip("# "))
        add("")

    add("## Commands (each in its own process, in this order)")
    add("")
    for name, r in results.items():
        if isinstance(r, dict) and "command" in r:
            add(f"- `{r['command']}` ({r.get('process_seconds', 0):.0f} s)")
    add("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and questions: checks the harness")
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run (default: all)")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="report path")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="raw results path")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per benchmark process")
    parser.add_argument("--report-only", metavar="JSON", help="re-render the report from a results.json; run nothing")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text(encoding="utf-8"))
        meta = saved.get("run", {})
        write_report(Path(args.output), QUICK if meta.get("mode") == "quick" else FULL, saved,
                     meta.get("argv", []), datetime.datetime.fromisoformat(meta["started"]) if "started" in meta
                     else datetime.datetime.now().astimezone(), meta.get("wall_seconds", 0.0))
        print(f"[bench] wrote {args.output} from {args.report_only}")
        return 0

    missing = common.shared_data_missing()
    if missing:
        print(f"[bench] skipped: {missing}")
        return 0
    mode = QUICK if args.quick else FULL
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    wanted = lambda name: not only or name in only  # noqa: E731
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    results: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="t5qa-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        made = run_worker("make_model.py", ["--output", str(model_dir), "--ct2"], work / "make_model.json",
                          args.timeout)
        results["make_model"] = made
        if "error" in made:
            print(f"[bench] cannot create the benchmark model: {made['error']}")
            return 0
        results["versions"] = made.get("versions", {})
        results["matmul-start"] = run_worker("bench_matmul.py", [], work / "matmul-start.json", args.timeout)
        per_round = mode.timed_steps // mode.rounds
        examples = per_round * common.BATCH_SIZE  # one epoch is exactly per_round steps
        results["train_examples"] = examples
        for round_ in range(1, mode.rounds + 1):
            for impl in ALTERNATING:
                if wanted(impl):
                    sizing = (["--warmup-steps", str(mode.warmup_steps), "--steps", str(mode.timed_steps_fixed)]
                              if impl in FIXED_SHAPE else
                              ["--warmup-steps", str(per_round), "--steps", str(per_round),
                               "--examples", str(examples)])
                    results[f"{impl} round {round_}"] = run_worker(
                        "bench_train.py", ["--impl", impl, "--model-dir", str(model_dir), *sizing],
                        work / f"{impl}-{round_}.json", args.timeout)
        for impl in ALTERNATING:
            if wanted(impl):
                results[impl] = combine_rounds([results[f"{impl} round {r}"] for r in range(1, mode.rounds + 1)])
        for impl in TRAIN_IMPLS:
            if not wanted(impl) or impl in ALTERNATING:
                continue
            steps = mode.timed_steps_fixed if impl in FIXED_SHAPE else mode.timed_steps
            results[impl] = run_worker("bench_train.py", ["--impl", impl, "--model-dir", str(model_dir),
                                                          "--warmup-steps", str(mode.warmup_steps),
                                                          "--steps", str(steps)], work / f"{impl}.json",
                                       args.timeout)
        for impl in PREDICT_IMPLS:
            if not wanted(impl):
                continue
            directory = model_dir
            if impl.startswith("t5qa-ct2-"):
                directory = Path(made.get(f"ct2_{impl.rsplit('-', 1)[1]}", work / "missing-ct2"))
                if not directory.is_dir():
                    results[impl] = {"error": made.get(f"ct2_{impl.rsplit('-', 1)[1]}_error", "no CTranslate2 export")}
                    continue
            results[impl] = run_worker("bench_predict.py", ["--impl", impl, "--model-dir", str(directory),
                                                            "--questions", str(mode.questions)],
                                       work / f"{impl}.json", args.timeout)
        if wanted("serve"):
            results["serve"] = run_worker("serve_throughput.py", ["--no-write", *mode.serve_args],
                                          work / "serve.json", args.timeout)
        if wanted("load"):
            results["load"] = run_worker("load_test.py", ["--requests", str(mode.load_requests), "--concurrency",
                                                          "32"], work / "load.json", args.timeout,
                                         failing_exit_keeps_result=True)
        for impl in TRAIN_EVAL_IMPLS:
            if wanted(f"train-eval-{impl}"):
                results[f"train-eval-{impl}"] = run_worker(
                    "bench_train_eval.py", ["--impl", impl, "--model-dir", str(model_dir), *mode.train_eval_args],
                    work / f"train-eval-{impl}.json", args.timeout)
        if mode.profile and wanted("profile"):
            results["profile"] = run_worker("profile_train.py", ["--model-dir", str(model_dir)],
                                            work / "profile.json", args.timeout)
        results["matmul-end"] = run_worker("bench_matmul.py", [], work / "matmul-end.json", args.timeout)
    wall = time.perf_counter() - t0
    results["run"] = {"mode": mode.name, "argv": argv, "started": started.isoformat(), "wall_seconds": wall}
    for target in (Path(args.output), Path(args.json)):
        target.parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")  # first: a report error keeps them
    write_report(Path(args.output), mode, results, argv, started, wall)
    print(f"[bench] wrote {args.output} and {args.json} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
