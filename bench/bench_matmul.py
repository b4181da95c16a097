"""This CPU's fp32 matmul rate with the benchmark's thread count: the denominator of model FLOP utilisation.

Square fp32 matrices of a few sizes, best of several repeats each, through torch.matmul (MKL) and, where this
PyTorch has it, oneDNN's linear operator (which t5qa's --fast-linear uses for forward products). The reported
rate is the best over sizes and libraries: the machine's attainable peak, not a theoretical one.
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

    try:
        from t5qa.fastpath.linear import onednn_linear_available
    except ImportError:  # t5qa not installed: MKL only
        def onednn_linear_available() -> bool:
            return False

    per_size, per_size_cpu, per_library = {}, {}, {"mkl": {}, "onednn": {}}
    for n in (int(x) for x in args.sizes.split(",")):
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        c = torch.empty(n, n, dtype=torch.float32)
        products = {"mkl": lambda: torch.matmul(a, b, out=c)}
        if onednn_linear_available():
            b_t = b.t().contiguous()
            products["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
        for library, product in products.items():
            product()  # warm-up: first call allocates and picks the kernel
            best = best_cpu = float("inf")
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                product()
                best = min(best, time.perf_counter() - start)
                best_cpu = min(best_cpu, time.process_time() - start_cpu)
            per_library[library][str(n)] = 2 * n**3 / best
            per_size[n] = max(per_size.get(n, 0.0), 2 * n**3 / best)  # FLOP/s
            # FLOP per CPU-second (all threads' time summed)
            per_size_cpu[n] = max(per_size_cpu.get(n, 0.0), 2 * n**3 / max(best_cpu, 1e-9))
    common.write_result(args.out, {
        "name": "matmul",
        "kind": "matmul",
        "flop_per_second": max(per_size.values()),
        "per_size": {str(k): v for k, v in per_size.items()},
        "flop_per_cpu_second": max(per_size_cpu.values()),
        "per_library": {k: v for k, v in per_library.items() if v},
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
