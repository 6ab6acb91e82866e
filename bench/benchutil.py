"""Shared helpers of the benchmarks: medians of repeated timings, tables, the bundle to use.

Benchmarks report numbers; they assert nothing. Every figure is a median of repeated runs measured
in the same process as its baseline, and ratios are ours / baseline (or baseline time / our time).
"""
from __future__ import annotations

import json
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


def run_closed_loop(call: Callable[[int], object], n_inputs: int, clients: int, seconds: float) -> dict:
    """`clients` threads each calling `call(i)` (i cycling over n_inputs) one after another for `seconds`:
    calls/s (`qps`), latency percentiles in ms and the number of calls that raised."""
    import threading

    import numpy as np

    lat: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(offset: int) -> None:
        i, mine = offset, []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                call(i % n_inputs)
                mine.append(time.perf_counter() - t0)
            except Exception:
                with lock:
                    errors[0] += 1
            i += clients
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    a = np.asarray(lat) * 1000
    return {"clients": clients, "qps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "errors": errors[0]}


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# Environment variables that cap the instruction sets torch's libraries use: set, they make this CPU
# run as an older one (e.g. ONEDNN_MAX_CPU_ISA=AVX2 for a CPU without AVX-512/AMX). Recorded with results.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "SEARCHREC_CPU_BF16")


def host() -> dict:
    """The machine a result was measured on: CPU model, flags, native bf16, cores, ISA limits, torch."""
    import platform

    import torch

    from common.cpu import cpu_kind

    limits = {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)}
    return {**cpu_kind(), "isa_limits": limits, "torch": torch.__version__, "python": platform.python_version()}


def write_json(path: Path, result: dict, **dump) -> dict:
    """Write a benchmark's result with the machine it ran on (`cpu_flags` at the top: figures from CPUs
    with and without native bf16 are not comparable). Returns what was written."""
    facts = host()
    out = {**result, "cpu_flags": facts["cpu_flags"], "native_bf16": facts["native_bf16"], "host": facts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=dump.pop("indent", 2), **dump))
    return out


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


def run_processes(n: int, script: Path, argv: list[str], out: Path) -> dict:
    """Run a benchmark's worker (`script argv`) as n data-parallel processes under torchrun (one: plain python);
    its rank 0 writes JSON to out, returned with the whole run's wall time as process_wall_s."""
    import subprocess

    cmd = [str(script), *argv]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n > 1 else []),
           *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    res = json.loads(Path(out).read_text())
    res["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return res
