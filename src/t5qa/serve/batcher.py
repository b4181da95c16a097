"""Server-side micro-batching: concurrent requests answered together.

Each request puts a job on an asyncio queue, and one worker task collects jobs for up to `max_wait_ms` (or until
`max_batch_size` pairs are waiting), runs the model once for all of them in a single background thread, and hands
each request its own answers. While the model runs, new requests queue up and form the next batch, so under load
every model call is a full batch. Requests asking for different generation options are never mixed in one model
call; an exception in the model fails only the request(s) that caused it.

Clients that send their next request as soon as they get an answer would otherwise split into groups that take
turns: while one group's batch runs, the other queues up and forms the next batch, so 16 such clients make
batches of 8 forever. So once a model call ends, the next batch waits a little (a share of that call's time) for
the clients it just answered, as long as fewer pairs are waiting than the last call answered plus those that
waited through it; the groups then merge into one batch. A lone client never waits for that (it is the one it
would wait for), and a batch that is already full never waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from t5qa.config import ServeConfig

logger = logging.getLogger(__name__)

# The wait for the clients the last model call answered: this share of that call's seconds, at most
# REGROUP_MAX_S. 16 clients answered together take some tens of ms to send their next requests through the
# HTTP stack, against 1-3 s for a t5-small batch on 2 CPU cores; the share bounds what the wait can cost.
REGROUP_SHARE = 0.1
REGROUP_MAX_S = 0.25


@dataclass
class BatchResult:
    """What one request gets back from the batcher."""

    answers: list[Any]
    model_seconds: float
    """Wall time of the model call that answered this request (shared with the rest of its batch)."""
    batch_pairs: int
    """Pairs in that model call, this request's included."""


@dataclass
class _Job:
    pairs: list[tuple[str, str]]
    options: tuple[tuple[str, Any], ...]
    future: asyncio.Future
    enqueued: float  # loop.time() in seconds


class MicroBatcher:
    """Collects concurrent requests into model calls of up to `max_batch_size` pairs.

    `answer_fn(pairs, options)` is the blocking model call; it runs in one dedicated thread so the event loop
    keeps accepting requests while the model works.
    """

    def __init__(self, answer_fn: Callable[[list[tuple[str, str]], dict[str, Any]], list[Any]], *,
                 config: ServeConfig | None = None, on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        config = config or ServeConfig()
        max_batch_size, max_wait_ms = config.max_batch_size, config.max_wait_ms  # checked by ServeConfig
        self.answer_fn = answer_fn
        self.on_batch = on_batch  # (pairs, seconds) after each model call: the server's metrics
        self.on_queue = on_queue  # (pairs waiting) whenever that changes
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.batches_run = 0
        self.requests_served = 0
        self._queue: asyncio.Queue | None = None
        self._pending: deque[_Job] = deque()
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._waiting_pairs = 0  # submitted, not yet taken into a model call
        self.regrouped = 0
        """How many batches waited for the clients the previous model call answered (tests, metrics)."""
        self._last_end = float("-inf")  # loop.time() when the last model call ended
        self._last_seconds = 0.0  # how long it ran
        self._last_pairs = 0  # how many pairs it answered

    @property
    def queue_size(self) -> int:
        """Pairs waiting for the model (not counting the batch the model is working on)."""
        return self._waiting_pairs

    def start(self) -> None:
        """Start the worker task on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._worker is not None and not self._worker.done() and self._loop is loop:
            return
        # A new loop (e.g. a test client without its context manager) gets its own queue and worker.
        self._loop = loop
        self._queue = asyncio.Queue()
        self._pending = deque()
        self._queued(-self._waiting_pairs)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t5qa-model")
        self._worker = loop.create_task(self._run(), name="t5qa-batcher")

    async def stop(self) -> None:
        """Cancel the worker and fail whatever is still waiting."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, pairs: Sequence[tuple[str, str]], options: dict[str, Any]) -> BatchResult:
        """Queue one request's pairs and wait for its answers (in the order of `pairs`)."""
        self.start()
        assert self._queue is not None and self._loop is not None
        future: asyncio.Future = self._loop.create_future()
        job = _Job(list(pairs), tuple(sorted(options.items())), future, self._loop.time())
        self._queued(len(job.pairs))
        await self._queue.put(job)
        return await future

    async def _run(self) -> None:
        assert self._queue is not None and self._loop is not None
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            first = self._pending[0]
            # The wait is measured from when the oldest job arrived: a job that queued while the model was
            # busy with the previous batch goes into the next one without waiting again.
            deadline = first.enqueued + self.max_wait_ms / 1000.0
            while not self._queue.empty():
                self._pending.append(self._queue.get_nowait())
            # Regrouping (module docstring): the pairs expected soon are those the last call answered (their
            # clients coming back) and those that waited through it; until then, wait up to the regroup deadline.
            expected = min(self.max_batch_size, self._last_pairs + self._pairs_like(first.options, self._last_end))
            regroup_deadline = self._last_end + min(REGROUP_SHARE * self._last_seconds, REGROUP_MAX_S)
            regrouping = False
            while True:
                while not self._queue.empty():
                    self._pending.append(self._queue.get_nowait())
                have = self._pairs_like(first.options)
                if have >= self.max_batch_size:
                    break
                regroup = have < expected and regroup_deadline > deadline
                timeout = (regroup_deadline if regroup else deadline) - self._loop.time()
                if timeout <= 0:
                    break
                regrouping = regrouping or (regroup and deadline <= self._loop.time())  # waits past its deadline
                try:
                    self._pending.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self.regrouped += regrouping
            batch = self._take(first.options)
            if batch:
                try:
                    await self._answer(batch)
                except asyncio.CancelledError:
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(RuntimeError("the server is shutting down"))
                    raise
                except Exception as exc:  # pragma: no cover - _answer already routes model errors to futures
                    logger.exception("micro-batch worker error")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _queued(self, delta: int) -> None:
        self._waiting_pairs += delta
        if delta and self.on_queue is not None:
            self.on_queue(self._waiting_pairs)

    def _pairs_like(self, options: tuple, enqueued_by: float = float("inf")) -> int:
        return sum(len(j.pairs) for j in self._pending
                   if j.options == options and not j.future.done() and j.enqueued <= enqueued_by)

    def _take(self, options: tuple) -> list[_Job]:
        """The oldest jobs with these options, up to max_batch_size pairs (always at least one job)."""
        batch: list[_Job] = []
        total = 0
        kept: deque = deque()
        for job in self._pending:
            if job.future.done():  # the client went away
                self._queued(-len(job.pairs))
                continue
            if job.options == options and (not batch or total + len(job.pairs) <= self.max_batch_size):
                batch.append(job)
                total += len(job.pairs)
                self._queued(-len(job.pairs))
            else:
                kept.append(job)
        self._pending = kept
        return batch

    async def _answer(self, batch: list[_Job]) -> None:
        assert self._loop is not None
        pairs = [pair for job in batch for pair in job.pairs]
        options = dict(batch[0].options)
        started = time.perf_counter()
        try:
            answers = await self._loop.run_in_executor(self._executor, self.answer_fn, pairs, options)
            if len(answers) != len(pairs):
                raise RuntimeError(f"the predictor returned {len(answers)} answers for {len(pairs)} pairs")
        except Exception as exc:
            if len(batch) > 1:
                # Find the request that broke the batch: answer each alone, so the others still succeed.
                for job in batch:
                    await self._answer([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self._last_end, self._last_seconds, self._last_pairs = self._loop.time(), seconds, len(pairs)
        self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(len(pairs), seconds)
        logger.debug("answered %d pairs from %d requests in %.3f s", len(pairs), len(batch), seconds)
        offset = 0
        for job in batch:
            mine = answers[offset:offset + len(job.pairs)]
            offset += len(job.pairs)
            if not job.future.done():
                self.requests_served += 1
                job.future.set_result(BatchResult(mine, seconds, len(pairs)))
