"""Shared helpers of the benchmarks: medians of repeated timings, tables, the bundle to use.

Benchmarks report numbers; they assert nothing. Every figure is a median of repeated runs measured
in the same process as its baseline, and ratios are ours / baseline (or baseline time / our time).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_s(fn: Callable[[], object], repeat: int = 7, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median seconds of fn() over `repeat` runs (after `warmup` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def bench_bundle() -> Path:
    """SEARCHREC_BENCH_BUNDLE, else bundles/homedepot, else bundles/sample."""
    env = os.environ.get("SEARCHREC_BENCH_BUNDLE")
    if env:
        return Path(env)
    for name in ("homedepot", "sample"):
        p = ROOT / "bundles" / name
        if (p / "manifest.json").is_file():
            return p
    raise SystemExit("no bundle: set SEARCHREC_BENCH_BUNDLE or build bundles/homedepot (or bundles/sample)")
