"""Load test of `t5qa serve`: a real uvicorn server on loopback, many concurrent clients, no request lost.

Starts the server in this process (uvicorn in a thread, the model in its micro-batching worker), fires
`--requests` POST /v1/answer requests from `--concurrency` concurrent clients (httpx.AsyncClient, one
connection pool), and counts:
- 5xx responses (must be 0),
- dropped requests: connection errors, timeouts, or a 200 whose body is not one answer per pair (must be 0),
- 4xx responses (must be 0: every request is valid),
plus p50/p90/p99 latency and throughput. The result is printed as JSON and, with --write, written to
bench/LOAD_RESULTS.md.

    .venv/bin/python bench/load_test.py --write                      # 2000 requests, 32 clients, tiny model
    .venv/bin/python bench/load_test.py --model runs/x/best --append  # a trained model directory
    .venv/bin/python bench/load_test.py --preset t5-small --requests 500 --append  # t5-small-shaped model

The tiny/t5-small models are built locally with random weights (no download); their answers are meaningless,
the serving path (HTTP parsing, validation, batching, generation, JSON) is the real one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "LOAD_RESULTS.md"

KEYS = ["code", "city", "color", "animal"]
VALUES = ["kilo", "lima", "oslo", "paris", "amber", "otter", "mars", "mango"]


@dataclass
class LoadResult:
    """What one load run measured (latencies in milliseconds, from send to full response)."""

    requests: int
    concurrency: int
    ok: int = 0
    client_errors_4xx: int = 0
    server_errors_5xx: int = 0
    dropped: int = 0
    """Connection errors, timeouts and malformed 200 responses: requests that got no usable answer."""
    seconds: float = 0.0
    requests_per_second: float = 0.0
    pairs_per_second: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    """Up to 10 examples of what went wrong."""
    server_batches: int | None = None
    server_requests_served: int | None = None


def _payload(rng: random.Random, pairs_per_request: int) -> dict[str, Any]:
    def pair() -> dict[str, str]:
        keys = rng.sample(KEYS, 3)
        facts = [f"the {k} is {rng.choice(VALUES)}" for k in keys]
        return {"context": " . ".join(facts) + " .", "question": f"what is the {rng.choice(keys)}?"}

    if pairs_per_request == 1:
        return pair()
    return {"pairs": [pair() for _ in range(pairs_per_request)]}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _load(base_url: str, requests: int, concurrency: int, *, pairs_per_request: int, seed: int,
                timeout_s: float, headers: dict[str, str] | None) -> LoadResult:
    import httpx

    result = LoadResult(requests=requests, concurrency=concurrency)
    latencies: list[float] = []
    next_index = 0
    rng = random.Random(seed)
    payloads = [_payload(rng, pairs_per_request) for _ in range(requests)]

    def note(message: str) -> None:
        if len(result.errors) < 10:
            result.errors.append(message)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                index = next_index
                next_index += 1
                body = payloads[index]
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/answer", json=body)
                except httpx.HTTPError as exc:  # connection refused/reset, timeout: the request was lost
                    result.dropped += 1
                    note(f"request {index}: {type(exc).__name__}: {exc}")
                    continue
                latencies.append((time.perf_counter() - started) * 1000.0)
                code = str(response.status_code)
                result.status_counts[code] = result.status_counts.get(code, 0) + 1
                if response.status_code >= 500:
                    result.server_errors_5xx += 1
                    note(f"request {index}: {response.status_code} {response.text[:200]}")
                elif response.status_code >= 400:
                    result.client_errors_4xx += 1
                    note(f"request {index}: {response.status_code} {response.text[:200]}")
                else:
                    try:
                        answers = response.json()["answers"]
                        usable = len(answers) == pairs_per_request and all(
                            isinstance(a.get("text"), str) for a in answers)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        usable = False
                    if usable:
                        result.ok += 1
                    else:
                        result.dropped += 1
                        note(f"request {index}: 200 with an unusable body {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
        try:
            health = (await client.get("/health")).json()
            result.server_batches = health.get("batches_run")
            result.server_requests_served = health.get("requests_served")
        except (httpx.HTTPError, ValueError):
            pass
    ordered = sorted(latencies)
    result.latency_ms = {f"p{q}": round(_percentile(ordered, q), 2) for q in (50, 90, 99)}
    result.latency_ms["max"] = round(ordered[-1], 2) if ordered else float("nan")
    result.latency_ms["mean"] = round(statistics.fmean(ordered), 2) if ordered else float("nan")
    result.requests_per_second = round(requests / result.seconds, 2) if result.seconds else 0.0
    result.pairs_per_second = round(requests * pairs_per_request / result.seconds, 2) if result.seconds else 0.0
    return result


def run_load(base_url: str, *, requests: int = 2000, concurrency: int = 32, pairs_per_request: int = 1,
             seed: int = 0, timeout_s: float = 120.0, headers: dict[str, str] | None = None) -> LoadResult:
    """Send `requests` POST /v1/answer requests from `concurrency` concurrent clients; count what came back."""
    return asyncio.run(_load(base_url, requests, concurrency, pairs_per_request=pairs_per_request, seed=seed,
                             timeout_s=timeout_s, headers=headers))


def build_model(preset: str, directory: Path) -> Path:
    """A randomly initialised model of a t5qa preset with a small locally trained tokenizer (no download)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from t5qa.modeling import PRESETS, ensure_generation_ids, save_model, train_tokenizer

    words = KEYS + VALUES + ["the", "is", "what", "question:", "context:", ".", "?"]
    rng = random.Random(1)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    tokenizer = train_tokenizer(corpus + ["question: what is the code? context: the code is kilo ."],
                                vocab_size=100)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), **PRESETS[preset]))
    ensure_generation_ids(model, tokenizer)
    out = directory / preset
    save_model(model, tokenizer, out, {"prompt_template": "question: {question} context: {context}",
                                       "max_source_tokens": 128, "stride_tokens": 32, "max_target_tokens": 8,
                                       "answer_tokens_p99": 4})
    return out


def write_results(result: LoadResult, command: str, model: str, settings: dict[str, Any],
                  load_average: tuple[float, float] | None = None, *, append: bool = False) -> None:
    """Write bench/LOAD_RESULTS.md (or, with `append`, add this run as a new section)."""
    import torch

    header = [
        "# t5qa serve load test",
        "",
        "Each section is one run of `bench/load_test.py`: a real uvicorn server on loopback, the model in its",
        "micro-batching worker, and the clients (httpx.AsyncClient) in the same process, so clients, server and",
        "model share the machine's cores and Python's GIL: the figures are a floor, not a ceiling.",
        "Dropped = connection errors, timeouts and 200 responses without one answer per pair. Latency is from",
        "sending the request to reading the whole response, at the client. Model calls < requests shows the",
        "server's micro-batching at work (concurrent requests answered in one generate call).",
        "",
        "The CI version (`tests/test_serve_abuse.py::test_load_400_requests_32_clients_no_5xx_no_drops`, marked",
        "slow) sends 400 requests from 32 clients and asserts zero 5xx, zero 4xx and zero dropped (no timing).",
    ]
    section = [
        "",
        f"## {model}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU core(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}, CPU. Server: {', '.join(f'{k}={v}' for k, v in settings.items())}.",
        *([f"Load average (1 min) before/after the run: {load_average[0]:.1f} / {load_average[1]:.1f} (other "
           "jobs shared the cores when it exceeds the core count)."] if load_average else []),
        "",
        "| requests | concurrent clients | ok | 4xx | 5xx | dropped | seconds | requests/s | "
        "p50 ms | p90 ms | p99 ms | max ms | model calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {result.requests} | {result.concurrency} | {result.ok} | {result.client_errors_4xx} | "
        f"{result.server_errors_5xx} | {result.dropped} | {result.seconds:.1f} | {result.requests_per_second} | "
        f"{result.latency_ms['p50']} | {result.latency_ms['p90']} | {result.latency_ms['p99']} | "
        f"{result.latency_ms['max']} | {result.server_batches} |",
    ]
    if result.errors:
        section += ["", "Errors seen:", ""] + [f"- `{e}`" for e in result.errors]
    if append and RESULTS.is_file():
        text = RESULTS.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(section) + "\n"
    else:
        text = "\n".join(header + section) + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without it
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pairs-per-request", type=int, default=1)
    parser.add_argument("--model", default=None, help="model directory (default: build one from --preset)")
    parser.add_argument("--preset", default="tiny", help="preset for the built model: tiny, mini, t5-small")
    from t5qa.config import ServeConfig

    defaults = ServeConfig()  # the server's own defaults, so the test loads what users run
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per-request client timeout")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name} (replacing it)")
    parser.add_argument("--append", action="store_true", help=f"add this run to {RESULTS.name}")
    parser.add_argument("--out", help="also write the figures as JSON here (bench/run.py reads it)")
    args = parser.parse_args(argv)

    import torch

    from t5qa.config import GenerateConfig
    from t5qa.predict import Predictor
    from t5qa.serve import ServeConfig, create_app, running_server

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    load_before = _load_average()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(args.preset, Path(tmp))
        predictor = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=args.max_new_tokens,
                                                                                 batch_size=args.max_batch_size))
        app = create_app(predictor, config=ServeConfig(max_batch_size=args.max_batch_size,
                                                       max_wait_ms=args.max_wait_ms))
        with running_server(app) as url:
            result = run_load(url, requests=args.requests, concurrency=args.concurrency,
                              pairs_per_request=args.pairs_per_request, timeout_s=args.timeout_s)
    print(json.dumps(asdict(result), indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"name": "load", "kind": "load", "preset": args.preset,
                                              "max_new_tokens": args.max_new_tokens, **asdict(result)}, indent=2),
                                  encoding="utf-8")
    if args.write or args.append:
        command = ".venv/bin/python bench/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
        model = args.model or f"{args.preset} preset, random weights, {len(predictor.tokenizer)}-token vocabulary"
        write_results(result, command.strip(), model, {"max_batch_size": args.max_batch_size,
                                                       "max_wait_ms": args.max_wait_ms,
                                                       "max_new_tokens": args.max_new_tokens,
                                                       "pairs_per_request": args.pairs_per_request},
                      load_average=(load_before, _load_average()) if load_before is not None else None,
                      append=args.append)
    return 0 if result.server_errors_5xx == 0 and result.dropped == 0 and result.client_errors_4xx == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
