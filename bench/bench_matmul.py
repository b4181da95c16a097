"""This CPU's fp32 matmul rate with the benchmark's thread count: the denominator of model FLOP utilisation.

Square fp32 matrices of a few sizes, best of several repeats each; the reported rate is the best over sizes
(the machine's attainable peak for torch.matmul, not a theoretical peak).
"""

from __future__ import annotations

import argparse
import time

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="result JSON path")
    parser.add_argument("--repeats", type=int, default=8, help="timed repeats per size (best is kept)")
    parser.add_argument("--sizes", default="1024,1536,2048", help="comma-separated matrix sizes")
    args = parser.parse_args()

    common.set_threads()
    import torch

    per_size, per_size_cpu = {}, {}
    for n in (int(x) for x in args.sizes.split(",")):
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        c = torch.empty(n, n, dtype=torch.float32)
        torch.matmul(a, b, out=c)  # warm-up: first call allocates and picks the kernel
        best = best_cpu = float("inf")
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            torch.matmul(a, b, out=c)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        per_size[n] = 2 * n**3 / best  # FLOP/s
        per_size_cpu[n] = 2 * n**3 / max(best_cpu, 1e-9)  # FLOP per CPU-second (all threads' time summed)
    common.write_result(args.out, {
        "name": "matmul",
        "kind": "matmul",
        "flop_per_second": max(per_size.values()),
        "per_size": {str(k): v for k, v in per_size.items()},
        "flop_per_cpu_second": max(per_size_cpu.values()),
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
