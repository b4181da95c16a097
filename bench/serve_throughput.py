"""Server throughput: `t5qa serve` with micro-batching vs the same server answering one request at a time.

Setting: a randomly initialised t5-small-shaped model (the real T5 tokenizer from ../shared/data; `--tiny`
for the 2-layer test model), TyDi QA English gold-passage dev questions, inputs limited to 384 tokens (longer
contexts are answered window by window), exactly 16 new tokens per answer (min_new_tokens = max_new_tokens =
16, so a random model's early stops cannot flatter either side), fp32 on CPU.

Each scenario starts the real server (`python -m t5qa serve`, uvicorn on 127.0.0.1) in its own process, sends
a few warm-up requests, then `--requests` requests from `--concurrency` concurrent clients (httpx, asyncio),
and measures requests/s and the p50/p99 latency seen by the clients:

  batched     max_batch_size 32, max_wait_ms 5, 16 concurrent clients
  one-by-one  max_batch_size 1 (the server runs one request per model call), 16 concurrent clients
  sequential  the batched server, one client sending one request after another (single-user latency)

Usage:
  python bench/serve_throughput.py            # t5-small shape, a few minutes on 2 CPU cores
  python bench/serve_throughput.py --quick    # fewer requests, under 2 minutes
  python bench/serve_throughput.py --tiny     # the 2-layer test model
Writes bench/SERVE_RESULTS.md (unless --no-write) and prints the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "t5-small-tokenizer"
DEV_FILE = SHARED_DATA / "tydiqa_goldp_en" / "english_tydiqa_dev.json"
RESULTS_FILE = Path(__file__).resolve().parent / "SERVE_RESULTS.md"

MAX_SOURCE_TOKENS = 384
STRIDE_TOKENS = 128
NEW_TOKENS = 16
THREADS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from t5qa.config import ServeConfig

    defaults = ServeConfig()  # the server's own defaults, so the benchmark measures what users get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (under 2 minutes)")
    p.add_argument("--tiny", action="store_true", help="the tiny 2-layer model instead of the t5-small shape")
    p.add_argument("--requests", type=int, default=None, help="timed requests per scenario (default 128; "
                                                               "16 with --quick)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help=f"the batched server's max batch (default {defaults.max_batch_size})")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                   help=f"the batched server's max wait (default {defaults.max_wait_ms:g})")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads of the server (default {THREADS})")
    p.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS_FILE.name}")
    p.add_argument("--out", help="also write the figures as JSON here (bench/run.py reads it)")
    return p.parse_args(argv)


def missing_data() -> str | None:
    for path in (TOKENIZER_DIR, DEV_FILE):
        if not path.exists():
            return f"{path} is absent: this benchmark needs ../shared/data (see its README.md)"
    return None


def read_questions(limit: int) -> list[tuple[str, str]]:
    """(context, question) pairs from the TyDi QA dev file (SQuAD layout), in file order."""
    data = json.loads(DEV_FILE.read_text(encoding="utf-8"))
    pairs = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                pairs.append((paragraph["context"], qa["question"]))
                if len(pairs) == limit:
                    return pairs
    return pairs


def build_model(directory: Path, tiny: bool) -> str:
    """Save a randomly initialised model with the T5 tokenizer to `directory`; returns its description."""
    import torch
    from transformers import AutoConfig, T5Config, T5ForConditionalGeneration

    from t5qa.modeling import PRESETS, count_parameters, ensure_generation_ids, load_tokenizer, save_model

    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    if tiny:
        config = T5Config(vocab_size=len(tokenizer), **PRESETS["tiny"])
        name = "tiny (2+2 layers, d_model 64)"
    else:
        config = AutoConfig.from_pretrained(str(TOKENIZER_DIR))
        name = "t5-small shape (6+6 layers, d_model 512)"
    model = T5ForConditionalGeneration(config)
    ensure_generation_ids(model, tokenizer)
    meta = {"prompt_template": "question: {question} context: {context}", "max_source_tokens": MAX_SOURCE_TOKENS,
            "stride_tokens": STRIDE_TOKENS, "max_target_tokens": 30, "answer_tokens_p99": NEW_TOKENS}
    save_model(model, tokenizer, directory, meta)
    return f"{name}, {count_parameters(model) / 1e6:.1f}M parameters, random weights"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m t5qa serve` in a child process; waits until /health answers."""

    def __init__(self, model_dir: Path, *, max_batch_size: int, max_wait_ms: float, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        env.pop("T5QA_API_KEY", None)
        self.command = [sys.executable, "-m", "t5qa", "-q", "serve", "--model", str(model_dir),
                        "--host", "127.0.0.1", "--port", str(self.port), "--max-batch-size", str(max_batch_size),
                        "--max-wait-ms", str(max_wait_ms), "--batch-size", str(max_batch_size)]
        # A file, not a pipe: a pipe nobody reads would block the server once it fills.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise RuntimeError(f"the server exited with {self.process.returncode}: {err[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def __enter__(self) -> "Server":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def load(url: str, pairs: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
    """Send every pair once from `concurrency` clients; requests/s and latency percentiles (seconds)."""
    import httpx

    latencies: list[float] = []
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(pairs):
            context, question = pairs[next_index]
            next_index += 1
            started = time.perf_counter()
            response = await http.post(url + "/v1/answer", json={
                "context": context, "question": question,
                "min_new_tokens": NEW_TOKENS, "max_new_tokens": NEW_TOKENS})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_second": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def run_scenario(model_dir: Path, pairs: list[tuple[str, str]], warmup: list[tuple[str, str]], *,
                 max_batch_size: int, max_wait_ms: float, concurrency: int, threads: int) -> dict[str, Any]:
    with Server(model_dir, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, threads=threads) as server:
        asyncio.run(load(server.url, warmup, min(concurrency, len(warmup))))
        before = server.health()
        result = asyncio.run(load(server.url, pairs, concurrency))
        after = server.health()
    batches = after["batches_run"] - before["batches_run"]
    result["model_calls"] = batches
    result["mean_batch"] = result["requests"] / batches if batches else float("nan")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = missing_data()
    if reason:
        print(f"skipped: {reason}")
        return 0
    n_requests = args.requests or (16 if args.quick else 128)
    n_warmup = 4 if args.quick else 8
    load_before = os.getloadavg()[0]
    all_pairs = read_questions(n_requests + n_warmup)
    warmup, pairs = all_pairs[:n_warmup], all_pairs[n_warmup:]
    print(f"{len(pairs)} timed requests per scenario (+{len(warmup)} warm-up), {args.concurrency} clients, "
          f"{NEW_TOKENS} new tokens each", flush=True)

    with tempfile.TemporaryDirectory(prefix="t5qa-serve-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        model_text = build_model(model_dir, args.tiny)
        print(f"model: {model_text}", flush=True)
        scenarios = [
            ("batched", dict(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             concurrency=args.concurrency)),
            ("one-by-one", dict(max_batch_size=1, max_wait_ms=0.0, concurrency=args.concurrency)),
            ("sequential", dict(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, concurrency=1)),
        ]
        results: dict[str, dict[str, Any]] = {}
        for name, settings in scenarios:
            timed = pairs if name != "sequential" else pairs[: max(4, len(pairs) // 4)]
            print(f"running {name} ...", flush=True)
            results[name] = run_scenario(model_dir, timed, warmup, threads=args.threads, **settings)
            r = results[name]
            print(f"  {name:<11} {r['requests_per_second']:7.2f} req/s   p50 {r['p50_ms']:8.0f} ms   "
                  f"p99 {r['p99_ms']:8.0f} ms   {r['model_calls']} model calls (mean batch {r['mean_batch']:.1f})",
                  flush=True)

    args.load_average = (load_before, os.getloadavg()[0])
    ratio = results["batched"]["requests_per_second"] / results["one-by-one"]["requests_per_second"]
    print(f"throughput ratio batched / one-by-one: {ratio:.2f}x")
    command = "python bench/serve_throughput.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if not args.no_write:
        RESULTS_FILE.write_text(report(results, ratio, model_text, args, command), encoding="utf-8")
        print(f"wrote {RESULTS_FILE.relative_to(REPO_ROOT)}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "name": "serve", "kind": "serve", "scenarios": results, "ratio_batched_vs_one_by_one": ratio,
            "concurrency": args.concurrency, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
            "model": model_text, "load_average": list(args.load_average)}, indent=2), encoding="utf-8")
    return 0


def report(results: dict[str, dict[str, Any]], ratio: float, model_text: str, args: argparse.Namespace,
           command: str) -> str:
    import torch

    rows = []
    for name, r in results.items():
        clients = 1 if name == "sequential" else args.concurrency
        batch = 1 if name == "one-by-one" else args.max_batch_size
        rows.append(f"| {name} | {batch} | {clients} | {r['requests']} | {r['requests_per_second']:.2f} | "
                    f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['model_calls']} | {r['mean_batch']:.1f} |")
    return "\n".join([
        "# `t5qa serve` throughput: micro-batching vs one request at a time",
        "",
        f"Command: `{command}`",
        "",
        f"- model: {model_text}; T5 tokenizer from ../shared/data/t5-small-tokenizer",
        f"- data: TyDi QA English gold passages, dev questions in file order; inputs up to {MAX_SOURCE_TOKENS} "
        f"tokens (longer contexts in windows, stride {STRIDE_TOKENS})",
        f"- generation: greedy, exactly {NEW_TOKENS} new tokens (min_new_tokens = max_new_tokens)",
        f"- server: `python -m t5qa serve` (uvicorn, 127.0.0.1) in its own process, torch {torch.__version__}, "
        f"{args.threads} threads, fp32 CPU; batched server: --max-batch-size {args.max_batch_size} "
        f"--max-wait-ms {args.max_wait_ms:g}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, shared with "
        f"other work (1-minute load average {args.load_average[0]:.1f} at the start, "
        f"{args.load_average[1]:.1f} at the end); clients: httpx AsyncClient in the benchmark process",
        "",
        "| scenario | server max batch | concurrent clients | requests | requests/s | p50 latency ms | "
        "p99 latency ms | model calls | mean pairs per call |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Throughput ratio, batched / one-by-one (16 concurrent clients): {ratio:.2f}x.**",
        "",
        "Latency is measured by the client (queueing included). `one-by-one` is the same server with "
        "`--max-batch-size 1`: the same requests arrive concurrently but every model call answers one. "
        "`sequential` is one client waiting for each answer before sending the next: the latency a lone user "
        "sees, and the throughput without any concurrency.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
