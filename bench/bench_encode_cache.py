"""Start-up of `t5qa train` on a large synthetic set: tokenising in memory against the on-disk encode cache.

The set: TyDi QA gold passages (English) repeated to --examples questions, each context made unique by a number in
front (so the cache key covers the whole set). Each measurement is `t5qa.train.setup` (load and clean the data,
load the t5-small-shaped model, tokenise or read the cache, build the loader, prove the fast paths) in a process
of its own, so its peak RSS is its own:

  memory   --encode-cache never: every feature as Python lists (today's path before the cache)
  first    --encode-cache always into an empty cache directory (tokenises with --num-proc, writes Arrow files)
  second   --encode-cache always again on the unchanged files: hashes them, reads what the first run made of them
           (the features memory-mapped, the validation questions, the cleaning report); the questions not read

    python bench/bench_encode_cache.py --examples 200000,1000000 --num-proc 2 --output bench/ENCODE_CACHE_RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent


def make_data(path: Path, examples: int) -> None:
    rows = common.read_squad(common.TRAIN_FILE)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(examples):
            row = rows[i % len(rows)]
            handle.write(json.dumps({"id": f"{row.id}-{i}", "question": row.question,
                                     "context": f"{i}. {row.context}", "answer": row.answer}) + "\n")


def worker(args: argparse.Namespace) -> None:
    """One measurement: train.setup on the data, in this process."""
    common.set_threads()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from t5qa.config import load_train_config
    from t5qa.train import setup

    cfg = load_train_config(None, model=args.model, train=args.data, validation=args.validation,
                            output=args.run, encode_cache=args.mode_cache, encode_cache_dir=args.cache,
                            num_proc=args.num_proc, max_steps=1, report_to=("none",), max_source_tokens=384,
                            stride_tokens=128, max_target_tokens=30, train_batch_size=8)
    started = time.perf_counter()
    run = setup(cfg)
    seconds = time.perf_counter() - started
    result = {"seconds": round(seconds, 1), "peak_rss_mb": round(common.peak_rss_mb()),
              "examples": run.train_examples, "encode_cache": run.summary["encode_cache"]}
    Path(args.out).write_text(json.dumps(result) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", default="200000,1000000", help="training set sizes, comma-separated")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--output", default=None, help="Markdown results file to write")
    parser.add_argument("--workdir", default=None, help="where the data, model, cache and runs go (default: temp)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "data", "validation", "run", "cache", "out", "mode-cache"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    missing = common.shared_data_missing()
    if missing:
        raise SystemExit(missing)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="t5qa-encode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(size) for size in str(args.examples).split(",")]
    validation, model = work / "validation.jsonl", work / "model"
    make_data(validation, 64)
    if not model.is_dir():
        import make_model

        make_model.make_model(model)
    results: dict[int, dict[str, dict]] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(common.REPO_ROOT / "src"), str(HERE)]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for size in sizes:
        data = work / f"train-{size}.jsonl"
        if not data.is_file():
            make_data(data, size)
        cache = work / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        results[size] = {}
        for name, mode in (("memory", "never"), ("first", "always"), ("second", "always")):
            out = work / f"{name}-{size}.json"
            out.unlink(missing_ok=True)
            command = [sys.executable, __file__, "--worker", "--model", str(model), "--data", str(data),
                       "--validation", str(validation), "--run", str(work / f"run-{name}"), "--cache", str(cache),
                       "--out", str(out), "--mode-cache", mode, "--num-proc", str(args.num_proc)]
            shutil.rmtree(work / f"run-{name}", ignore_errors=True)
            code, peak, seconds, err = _run_watched(command, env)
            if code == 0:
                results[size][name] = json.loads(out.read_text())
            elif code == -9:  # the kernel's OOM killer: the figure is how far it got
                results[size][name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak),
                                       "encode_cache": "killed: out of memory"}
            else:
                raise SystemExit(f"{name} ({size}): exit {code}: {err[-3000:]}")
            print(size, name, results[size][name], flush=True)
        results[size]["cache_mb"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
        shutil.rmtree(cache, ignore_errors=True)
    text = _report(results, args)
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")


def _run_watched(command: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in MiB seen by polling, seconds, stderr) of a worker; the poll also sees a process
    that the OOM killer ends, whose own peak would be lost."""
    import psutil

    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        watched, peak = psutil.Process(process.pid), 0.0
        while process.poll() is None:
            try:
                rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.5)
        err.seek(0)
        return process.returncode, peak, time.perf_counter() - started, err.read()


def _report(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Start-up of `t5qa train` with the encode cache", "",
        f"`python bench/bench_encode_cache.py --examples {args.examples} --num-proc {args.num_proc}` "
        f"({time.strftime('%Y-%m-%d')}, {common.cpu_name()}, {common.THREADS} threads, "
        f"{_memory_gib():.0f} GiB of memory). Each row is `t5qa.train.setup` in a process of its own: load and "
        f"clean the training questions (TyDi QA passages repeated, each context made unique), load the "
        f"t5-small-shaped model, tokenise (384 source, 30 target tokens) or read the cache, build the loader, "
        f"prove the fast paths. Peak RSS is the process's own (`ru_maxrss`), or, for a process the kernel killed, "
        f"the highest the benchmark saw by polling.", "",
        "| questions | run | encode cache | start-up (s) | peak RSS (MiB) |", "|---|---|---|---|---|",
    ]
    for size, runs in results.items():
        for name, label in (("memory", "in memory (`--encode-cache never`)"),
                            ("first", f"first run, tokenised into the cache (`--num-proc {args.num_proc}`)"),
                            ("second", "second run, read from the cache")):
            r = runs[name]
            lines.append(f"| {size:,} | {label} | {r['encode_cache']} | {r['seconds']} | {r['peak_rss_mb']:,} |")
    lines.append("")
    for size, runs in results.items():
        memory, second = runs["memory"], runs["second"]
        if "killed" in memory["encode_cache"]:
            lines.append(f"- {size:,} questions: tokenising in memory was killed for lack of memory after "
                         f"{memory['seconds']} s at {memory['peak_rss_mb']:,} MiB; the second run with the cache "
                         f"started in {second['seconds']} s at {second['peak_rss_mb']:,} MiB. The cache takes "
                         f"{runs['cache_mb']:,.0f} MiB on disk.")
        else:
            lines.append(f"- {size:,} questions: the second run starts in {second['seconds'] / memory['seconds']:.2f}x "
                         f"the time of tokenising in memory and peaks at "
                         f"{second['peak_rss_mb'] / memory['peak_rss_mb']:.2f}x its memory; the cache takes "
                         f"{runs['cache_mb']:,.0f} MiB on disk.")
    lines += ["", "The second run reads neither the questions nor their features into memory: it hashes the "
                  "training file (its SHA-256 is the cache's key, with the settings and the tokenizer), maps the "
                  "cached features and reads the validation questions, so its memory does not grow with the training "
                  "set. The first run still reads the whole file into examples once, to clean and split it (the "
                  "examples are let go once tokenised); a set past memory trains with `--streaming`."]
    return "\n".join(lines) + "\n"


def _memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


if __name__ == "__main__":
    main()
