"""Compute threads: how the server splits the cores (compute_plan) and the gate that lets batches
share a bundle while a live catalog change has it alone (ComputeGate)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from server.config import ServerConfig, compute_plan
from server.runtime import ComputeGate


def cfg(**kw) -> ServerConfig:
    return ServerConfig(bundle=Path("."), **kw)


@pytest.mark.parametrize("cores,expected", [(1, (1, 1)), (2, (2, 1)), (3, (2, 1)), (16, (2, 8))])
def test_auto_plan_splits_the_cores(cores, expected):
    assert compute_plan(cfg(), cores) == expected


def test_explicit_workers_and_threads_win():
    assert compute_plan(cfg(compute_workers=1), 2) == (1, 2)
    assert compute_plan(cfg(compute_workers=4, torch_threads=3), 2) == (4, 3)
    assert compute_plan(cfg(torch_threads=2), 16) == (2, 2)


@pytest.mark.parametrize("field", ["compute_workers", "torch_threads"])
def test_negative_counts_are_refused(field):
    with pytest.raises(ValueError, match=field):
        cfg(**{field: -1})


def test_exclusive_waits_for_shared_and_keeps_new_ones_out():
    gate = ComputeGate()
    log: list[str] = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def reader(name: str, hold: threading.Event | None = None) -> None:
        with gate.shared():
            log.append(f"{name} in")
            if hold is not None:
                reader_in.set()
                hold.wait(10)
            log.append(f"{name} out")

    def writer() -> None:
        with gate.exclusive():
            log.append("writer in")
            time.sleep(0.02)
            log.append("writer out")

    first = threading.Thread(target=reader, args=("r1", release_reader))
    first.start()
    assert reader_in.wait(10)
    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 10
    while gate.writers_waiting != 1:  # the writer is now waiting for r1
        assert time.monotonic() < deadline, "the writer never queued"
        time.sleep(0.001)
    late = threading.Thread(target=reader, args=("r2",))
    late.start()
    time.sleep(0.05)  # r2 must queue behind the waiting writer, not slip in beside r1
    assert log == ["r1 in"]
    release_reader.set()
    for t in (first, w, late):
        t.join(10)
    assert log == ["r1 in", "r1 out", "writer in", "writer out", "r2 in", "r2 out"]


def test_shared_holders_run_side_by_side():
    gate = ComputeGate()
    barrier = threading.Barrier(2, timeout=10)
    errors: list[Exception] = []

    def reader() -> None:
        try:
            with gate.shared():
                barrier.wait()  # both must be inside at once
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
