"""A model-agnostic dynamic batcher for asyncio servers.

Callers `submit` one item and await its result; a worker task gathers up to `max_batch_size` items,
drops work whose caller has gone
(cancelled) or whose deadline has passed (never computed), runs the batch function in an executor
thread so the event loop keeps accepting, and hands each caller its own result. Up to `concurrency`
batches run at once (one per compute thread); the next batch is formed only when a slot is free, so
under load the queue fills the batch instead of splitting it. When a slot is free the batch closes at
once with whatever is queued (as Triton's and TEI's schedulers do): waiting `max_delay_ms` for company
while a core sits idle only adds latency, and while every slot is busy the queue fills by itself.
`idle_wait=True` restores the older rule (a batch waits up to `max_delay_ms` after its first item even
when a slot is free), kept for comparisons. A batch that fails
fails only its own callers. The queue is bounded: a full queue is rejected at once (`Overloaded`), and so is a call whose deadline
would pass while it waits behind the queue (estimated from the recent batch compute time and the
event loop's lag).
The batcher knows nothing about models: it takes a callable `list[T] -> list[R]`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from server.errors import DeadlineExpired, Overloaded, Unavailable

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass
class BatcherStats:
    """Cumulative counters; updated on the event loop thread only."""

    batches_run: int = 0
    items_computed: int = 0
    queue_s_total: float = 0.0
    compute_s_total: float = 0.0
    done: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    failed: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    # Called after every computed batch with (batcher kind, size, compute seconds, each queue time);
    # the metrics module hangs its histograms here.
    observer: Callable[[str, int, float, list[float]], None] | None = field(default=None, repr=False, compare=False)

    @property
    def mean_batch_size(self) -> float:
        return self.items_computed / self.batches_run if self.batches_run else 0.0

    @property
    def mean_queue_ms(self) -> float:
        return 1000 * self.queue_s_total / self.items_computed if self.items_computed else 0.0

    @property
    def mean_compute_ms(self) -> float:
        return 1000 * self.compute_s_total / self.batches_run if self.batches_run else 0.0


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """One caller's result and how it was obtained."""

    value: R
    queue_s: float
    compute_s: float
    batch_size: int


class _Entry:
    __slots__ = ("item", "future", "deadline", "enqueued")

    def __init__(self, item, future: asyncio.Future, deadline: float | None, enqueued: float) -> None:
        self.item = item
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued


class DynamicBatcher(Generic[T, R]):
    """Gather concurrent submissions into batches for `fn` (see module docstring)."""

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        executor: Executor | None = None,
        stats: BatcherStats | None = None,
        name: str = "batcher",
        lag: "LoopLag | None" = None,
        admit_fraction: float = 1.0,
        concurrency: int = 1,
        idle_wait: bool = False,
    ) -> None:
        if not callable(fn):
            raise TypeError("fn must be callable")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.executor = executor
        self.stats = stats if stats is not None else BatcherStats()
        self.name = name
        self.lag = lag
        # A queued call is admitted only if its predicted wait fits in this fraction of its remaining
        # deadline: the rest is headroom for estimate error and for the answer's way back to the caller.
        self.admit_fraction = admit_fraction
        self._queue: collections.deque[_Entry] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None
        self.concurrency = concurrency
        self.idle_wait = idle_wait
        self._inflight = 0  # batches being computed
        self.max_inflight = 0  # the most batches computed at once so far
        # Moving average of one batch's compute time. Per batch, not per request: under overload batches
        # are full, and a per-request average taken from small batches overstates the cost (fixed costs).
        self._batch_s: float | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Batches being computed now (at most `concurrency`)."""
        return self._inflight

    def start(self) -> None:
        """Start the worker task on the running loop (idempotent)."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def submit(self, item: T, deadline: float | None = None) -> BatchResult[R]:
        """Queue item and wait for its result. deadline is absolute, in `time.monotonic()` seconds."""
        if self._closing:
            raise Unavailable(f"{self.name} is shutting down")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self.stats.expired += 1
            raise DeadlineExpired("the deadline had passed before the request was queued")
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(f"server overloaded: the queue is full ({self.max_queue} requests waiting); retry later")
        if deadline is not None and self._queue and self._batch_s is not None:
            # Admission by deadline: a call that would still be queued when its deadline passes is refused
            # now, cheaply, instead of holding a slot and expiring later. An idle server admits everything.
            # The answer also has to travel back through the event loop: under a flood that loop is
            # itself the bottleneck, so its measured lag counts (twice: the request in, the answer out).
            ahead = len(self._queue) // self.max_batch_size + 1 + self._inflight
            rounds = -(-ahead // self.concurrency)  # batches ahead, run `concurrency` at a time
            wait_s = rounds * self._batch_s + 2 * (self.lag.seconds if self.lag is not None else 0.0)
            if wait_s > self.admit_fraction * (deadline - now):
                self.stats.rejected += 1
                raise Overloaded(f"server overloaded: {len(self._queue)} requests are queued ahead (about "
                                 f"{1000 * wait_s:.0f} ms of work) and this call's deadline is in "
                                 f"{1000 * (deadline - now):.0f} ms; retry later")
        self.start()
        entry = _Entry(item, asyncio.get_running_loop().create_future(), deadline, now)
        self._queue.append(entry)
        self._wakeup.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The caller has gone: free its slot at once rather than computing for nobody.
            try:
                self._queue.remove(entry)
            except ValueError:
                pass  # already taken into a batch; its result will be discarded
            self.stats.cancelled += 1
            raise

    async def close(self) -> None:
        """Stop accepting, finish what is queued, and stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    async def _next_batch(self) -> list[_Entry]:
        """Wait for work (called holding a free compute slot), then take what is queued at once; with
        `idle_wait`, first wait for a full batch or the first item's delay to run out."""
        while not self._queue:
            if self._closing:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        close_at = self._queue[0].enqueued + self.max_delay_s
        while self.idle_wait and len(self._queue) < self.max_batch_size and not self._closing:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        now = time.monotonic()
        # A call whose deadline passes before this batch can finish is not computed: its caller would
        # be gone by then, and the time is better spent on the others.
        finish = now + (self._batch_s or 0.0)
        while self._queue and len(batch) < self.max_batch_size:
            entry = self._queue.popleft()
            if entry.future.done():
                continue  # cancelled while queued
            if entry.deadline is not None and entry.deadline <= finish:
                self.stats.expired += 1
                entry.future.set_exception(DeadlineExpired(
                    "the deadline passed while the request was queued" if entry.deadline <= now else
                    "the deadline would pass before the request could be computed"))
                continue
            batch.append(entry)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task] = set()
        while True:
            await slots.acquire()  # form the next batch only when a compute slot is free
            batch = await self._next_batch()
            if not batch:
                slots.release()
                if self._closing and not self._queue:
                    break
                continue
            task = loop.create_task(self._compute(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)

    async def _compute(self, batch: list[_Entry], slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        items = [e.item for e in batch]
        self._inflight += 1
        self.max_inflight = max(self.max_inflight, self._inflight)
        try:
            results = await loop.run_in_executor(self.executor, self.fn, items)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: batch function returned {len(results)} results for {len(batch)} items"
                )
        except Exception as exc:  # fail this batch's callers only; the worker carries on
            log.exception("%s: batch of %d failed", self.name, len(batch))
            self.stats.failed += len(batch)
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        finally:
            self._inflight -= 1
            slots.release()
        finished = time.monotonic()
        compute_s = finished - started
        self._batch_s = compute_s if self._batch_s is None else 0.8 * self._batch_s + 0.2 * compute_s
        self.stats.batches_run += 1
        self.stats.items_computed += len(batch)
        self.stats.compute_s_total += compute_s
        self.stats.batch_sizes[len(batch)] += 1
        if self.stats.observer is not None:
            self.stats.observer(self.name.split("[", 1)[0], len(batch), compute_s,
                                [started - e.enqueued for e in batch])
        for e, value in zip(batch, results):
            queue_s = started - e.enqueued
            self.stats.queue_s_total += queue_s
            if not e.future.done():
                self.stats.done += 1
                e.future.set_result(BatchResult(value, queue_s, compute_s, len(batch)))


class LoopLag:
    """How late the event loop runs a timer that should fire every `every_s` (moving average of the
    overshoot): a direct measure of how long any callback, a reply included, waits for the loop."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s = every_s
        self.seconds = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.every_s)
            late = max(0.0, time.monotonic() - t0 - self.every_s)
            self.seconds = 0.7 * self.seconds + 0.3 * late

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
