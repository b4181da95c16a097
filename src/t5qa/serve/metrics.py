"""`GET /metrics` of `t5qa serve`, in Prometheus' text format, through `prometheus-client`.

What is counted: requests by route and status, request latency (a histogram per route), the pairs in each model
call, the model's seconds per call, and the pairs waiting for the model. One app has its own registry (several
apps in one process, as in tests, never share counters). Under `serve --workers N` every worker writes its
numbers into PROMETHEUS_MULTIPROC_DIR, which the serve command sets before the workers start, and a scrape of
any worker reads all of them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

# Request latency (seconds): a cached answer is milliseconds; a batch of long contexts is seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether this process shares its numbers with other workers (PROMETHEUS_MULTIPROC_DIR is set)."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class ServerMetrics:
    """The server's Prometheus metrics; `render()` is the body of GET /metrics."""

    def __init__(self, routes: tuple[str, ...]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.routes = routes
        self.registry = CollectorRegistry(auto_describe=True)
        # In multiprocess mode the values live in files; the registry is only this process's handle on them.
        self.requests = Counter("t5qa_requests", "HTTP requests by route and status code.",
                                ("method", "route", "status"), registry=self.registry)
        self.latency = Histogram("t5qa_request_seconds", "Time from a request's arrival to its response.",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_pairs = Histogram("t5qa_batch_pairs", "Pairs answered in one model call.",
                                     buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_seconds = Histogram("t5qa_model_seconds", "Wall time of one model call.",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("t5qa_queue_pairs", "Pairs waiting for the model (every worker's, summed).",
                           registry=self.registry, multiprocess_mode="livesum")

    def route_of(self, path: str) -> str:
        """The route label of a path: a known route, or "other" (a label per unknown URL would grow without end)."""
        if path in self.routes:
            return path
        return "/static" if path.startswith("/static/") else "other"

    def record_request(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route_of(path)
        self.requests.labels(method if method in ("GET", "POST", "HEAD") else "other", route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def record_batch(self, pairs: int, seconds: float) -> None:
        self.batch_pairs.observe(pairs)
        self.model_seconds.observe(seconds)

    def set_queue(self, pairs: int) -> None:
        self.queue.set(pairs)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape: this process's metrics, or every worker's in multiprocess mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry: Any = self.registry
        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
