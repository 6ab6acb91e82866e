"""The dynamic batcher on plain asyncio: size, delay, deadlines, failure isolation, cancellation, full queue."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.batcher import DynamicBatcher
from server.errors import DeadlineExpired, Overloaded, Unavailable


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def until(condition, timeout: float = 10.0) -> None:
    """Wait for a state, not for a guess of how long reaching it takes (a loaded machine is slow)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the batcher"
        await asyncio.sleep(0.001)


class Recorder:
    """A batch function that records the batches it saw, optionally blocking until released."""

    def __init__(self, fail_on=None, gate: threading.Event | None = None):
        self.batches: list[list] = []
        self.fail_on = fail_on
        self.gate = gate
        self.started = threading.Event()  # set when the first batch begins computing

    def __call__(self, items):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [x * 10 for x in items]


def test_constructor_validates_arguments():
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=0, max_delay_ms=1, max_queue=1)
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=1, max_delay_ms=-1, max_queue=1)
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=1, max_delay_ms=1, max_queue=0)
    with pytest.raises(TypeError):
        DynamicBatcher(42, max_batch_size=1, max_delay_ms=1, max_queue=1)


def test_batches_up_to_max_size_and_returns_each_callers_result():
    async def main():
        fn = Recorder()
        b = DynamicBatcher(fn, max_batch_size=4, max_delay_ms=50, max_queue=100)
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.close()
        return fn, results, b.stats

    fn, results, stats = run(main())
    assert [r.value for r in results] == [i * 10 for i in range(10)]
    assert max(len(x) for x in fn.batches) == 4
    assert sorted(x for batch in fn.batches for x in batch) == list(range(10))
    assert stats.batches_run == len(fn.batches) and stats.items_computed == 10
    assert results[0].batch_size == len(fn.batches[0])


def test_a_free_slot_takes_a_lone_request_at_once_whatever_the_delay():
    # Behaviour, not timing: with a one-minute delay, the old rule (wait for company while the slot is
    # idle) could not answer inside the 30 s that run() allows.
    async def main():
        fn = Recorder()
        b = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=60_000, max_queue=10)
        result = await asyncio.wait_for(b.submit(7), 10)
        await b.close()
        return fn, result

    fn, result = run(main())
    assert result.value == 70 and fn.batches == [[7]] and result.batch_size == 1


def test_requests_queued_while_every_slot_is_busy_form_the_next_batch():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=60_000, max_queue=10, executor=pool)
            first = asyncio.ensure_future(b.submit(1))
            await until(fn.started.is_set)  # the only slot is busy with [1]
            rest = [asyncio.ensure_future(b.submit(i)) for i in (2, 3, 4)]
            await until(lambda: b.queue_depth == 3)
            gate.set()
            results = await asyncio.gather(first, *rest)
            await b.close()
        return fn, results

    fn, results = run(main())
    assert fn.batches == [[1], [2, 3, 4]]
    assert [r.batch_size for r in results] == [1, 3, 3, 3]


def test_two_free_slots_compute_two_lone_requests_side_by_side():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=60_000, max_queue=10, executor=pool, concurrency=2)
            first = asyncio.ensure_future(b.submit(1))
            await until(lambda: b.in_flight == 1)
            second = asyncio.ensure_future(b.submit(2))
            await until(lambda: b.in_flight == 2)  # the second slot did not wait for company either
            gate.set()
            await asyncio.gather(first, second)
            await b.close()
        return fn, b

    fn, b = run(main())
    assert sorted(map(tuple, fn.batches)) == [(1,), (2,)] and b.max_inflight == 2


def test_idle_wait_keeps_the_old_rule_a_lone_request_runs_after_the_delay():
    async def main():
        fn = Recorder()
        b = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=20, max_queue=10, idle_wait=True)
        result = await b.submit(7)
        await b.close()
        return fn, result

    fn, result = run(main())
    assert result.value == 70 and fn.batches == [[7]]


def test_idle_wait_requests_arriving_within_the_delay_share_a_batch():
    async def main():
        fn = Recorder()
        b = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=300, max_queue=10, idle_wait=True)
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(b.submit(2))
        await asyncio.gather(first, second)
        await b.close()
        return fn

    assert run(main()).batches == [[1, 2]]


def test_expired_work_is_dropped_before_compute():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0, max_queue=10,
                           executor=ThreadPoolExecutor(1))
        blocker = asyncio.ensure_future(b.submit(1))  # occupies the compute thread
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(b.submit(2, deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.2)  # its deadline passes while it waits behind the blocker
        gate.set()
        await blocker
        with pytest.raises(DeadlineExpired):
            await doomed
        with pytest.raises(DeadlineExpired):
            await b.submit(3, deadline=time.monotonic() - 1)  # already expired: never queued
        await b.close()
        return fn, b.stats

    fn, stats = run(main())
    assert fn.batches == [[1]], "expired requests must never be computed"
    assert stats.expired == 2


def test_a_failing_batch_fails_only_its_own_requests():
    async def main():
        fn = Recorder(fail_on=3)
        b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=50, max_queue=10)
        results = await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)
        later = await b.submit(9)  # the worker survives
        await b.close()
        return fn, results, later

    fn, results, later = run(main())
    bad_batch = next(batch for batch in fn.batches if 3 in batch)
    for i, r in enumerate(results):
        if i in bad_batch:
            assert isinstance(r, ValueError)
        else:
            assert r.value == i * 10
    assert later.value == 90


def test_wrong_result_count_fails_the_batch():
    async def main():
        b = DynamicBatcher(lambda items: items[:-1], max_batch_size=4, max_delay_ms=10, max_queue=10)
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        await b.close()
        return results

    assert all(isinstance(r, RuntimeError) for r in run(main()))


def test_cancelled_calls_are_removed_and_never_computed():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0, max_queue=2,
                           executor=ThreadPoolExecutor(1))
        blocker = asyncio.ensure_future(b.submit(1))
        await until(fn.started.is_set)  # 1 occupies the only compute thread
        waiting = asyncio.ensure_future(b.submit(2))
        await until(lambda: b.queue_depth == 1)
        waiting.cancel()
        await asyncio.sleep(0)  # one loop turn: the cancellation lands
        depth_after_cancel = b.queue_depth  # the slot is free at once
        gate.set()
        await blocker
        await b.close()
        return fn, depth_after_cancel, b.stats

    fn, depth, stats = run(main())
    assert depth == 0
    assert fn.batches == [[1]]
    assert stats.cancelled == 1


def test_full_queue_is_rejected_at_once():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0, max_queue=2, executor=ThreadPoolExecutor(1))
        running = asyncio.ensure_future(b.submit(0))
        await until(fn.started.is_set)  # 0 is computing, the queue is empty
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await until(lambda: b.queue_depth == 2)
        with pytest.raises(Overloaded, match="queue is full"):
            await b.submit(3)
        # Refused while the gate still holds everything ahead of it: the refusal did not wait for the queue.
        still_pending = not gate.is_set() and not any(f.done() for f in (running, *queued))
        gate.set()
        done = await asyncio.gather(running, *queued)
        await b.close()
        return done, b.stats, still_pending

    done, stats, still_pending = run(main())
    assert [r.value for r in done] == [0, 10, 20]
    assert stats.rejected == 1
    assert still_pending


def test_close_drains_the_queue_then_refuses_new_work():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=2, max_delay_ms=50, max_queue=10)
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await b.close()
        results = [p.result().value for p in pending]
        with pytest.raises(Unavailable):
            await b.submit(99)
        return results

    assert run(main()) == [0, 10, 20, 30, 40]


def test_event_loop_stays_responsive_while_a_batch_computes():
    async def main():
        gate = threading.Event()
        b = DynamicBatcher(Recorder(gate=gate), max_batch_size=1, max_delay_ms=0, max_queue=10,
                           executor=ThreadPoolExecutor(1))
        job = asyncio.ensure_future(b.submit(1))
        ticks = 0
        for _ in range(5):  # the loop keeps running while the batch function blocks its thread
            await asyncio.sleep(0.01)
            ticks += 1
        gate.set()
        await job
        await b.close()
        return ticks

    assert run(main()) == 5


class Slow(Recorder):
    """A batch function that takes `seconds` per batch."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __call__(self, items):
        self.started.set()
        time.sleep(self.seconds)
        return super().__call__(items)


def test_a_call_that_cannot_make_its_deadline_behind_the_queue_is_refused_at_once():
    async def main():
        fn = Slow(0.2)
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0, max_queue=10, executor=ThreadPoolExecutor(1))
        await b.submit(0)  # learns that a batch takes ~0.2 s
        first = asyncio.ensure_future(b.submit(1))
        queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="queued ahead"):
            await b.submit(4, deadline=time.monotonic() + 0.3)  # ~4 batches of 0.2 s ahead
        refused_in = time.monotonic() - t0
        admitted = await b.submit(5, deadline=time.monotonic() + 10)  # a long deadline still gets in
        await asyncio.gather(first, *queued)
        await b.close()
        return fn, b.stats, refused_in, admitted

    fn, stats, refused_in, admitted = run(main())
    assert stats.rejected == 1 and admitted.value == 50
    assert [4] not in fn.batches
    print(f"refused in {1000 * refused_in:.2f} ms")


def test_an_idle_batcher_admits_short_deadlines_and_never_computes_expired_calls():
    async def main():
        fn = Slow(0.2)
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=0, max_queue=10, executor=ThreadPoolExecutor(1))
        await b.submit(0)
        fn.started.clear()
        blocker = asyncio.ensure_future(b.submit(1))  # computing for 0.2 s
        await until(fn.started.is_set)
        # Queue empty: admitted, but its deadline passes while it waits behind the running batch.
        with pytest.raises(DeadlineExpired):
            await b.submit(2, deadline=time.monotonic() + 0.05)
        await blocker
        await b.close()
        return fn, b.stats

    fn, stats = run(main())
    assert fn.batches == [[0], [1]]  # 2 was never computed
    assert stats.expired == 1 and stats.rejected == 0


def test_concurrency_runs_batches_side_by_side_and_no_more():
    """With concurrency 2 two batches compute at once: both wait on one barrier, which would time out
    (and fail the batch) if they ran one after the other."""
    barrier = threading.Barrier(2, timeout=10)
    started = []

    def fn(items):
        started.append(list(items))
        if len(started) <= 2:
            barrier.wait()  # raises BrokenBarrierError unless the first two batches overlap
        return [x * 10 for x in items]

    async def main():
        with ThreadPoolExecutor(max_workers=3) as pool:
            b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=0, max_queue=100, executor=pool, concurrency=2)
            first = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
            await asyncio.sleep(0)
            while len(started) < 1:
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 8)]
            results = await asyncio.gather(*first, *rest)
            await b.close()
            return b, results

    b, results = run(main())
    assert [r.value for r in results] == [i * 10 for i in range(8)]
    assert b.max_inflight == 2
    assert b.stats.failed == 0
    assert sorted(x for batch in started for x in batch) == list(range(8))


def test_concurrency_one_never_overlaps_batches():
    active, peak = [0], [0]
    lock = threading.Lock()

    def fn(items):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.005)
        with lock:
            active[0] -= 1
        return list(items)

    async def main():
        with ThreadPoolExecutor(max_workers=4) as pool:
            b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=0, max_queue=100, executor=pool)
            await asyncio.gather(*(b.submit(i) for i in range(20)))
            await b.close()
            return b

    b = run(main())
    assert peak[0] == 1 and b.max_inflight == 1


def test_concurrency_is_validated():
    with pytest.raises(ValueError, match="concurrency"):
        DynamicBatcher(Recorder(), max_batch_size=1, max_delay_ms=1, max_queue=1, concurrency=0)
