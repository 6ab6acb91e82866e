"""Run every benchmark and write the headline figures.

    python bench/run_all.py [--quick] [--bundle DIR] [--dtype auto|float32|bfloat16|int8] --json OUT

--quick (under 10 minutes here): fewer batch sizes and concurrency levels, 4 s per level, ANN at
200,000 vectors instead of 1,000,000. Keys written: served_over_inprocess, batching_gain,
ann_1m_recall@100, ann_1m_speedup, kernel_speedup, startup_s (the encoder graph cached, as at every
restart), startup_first_s (the first start, which exports or traces it), served_qps_p99_50ms, rss_mb,
overhead_ms (served p50 at one client minus one query in process), backend (the encoder engine served),
served_qps_gain (served_qps_p99_50ms over the old defaults': torch encoder, batches waiting while a slot
idles), served_qps_gain_fp32 (the same over the old defaults with the fp32 torch encoder),
overhead_paired_ms (per call: the caller's latency minus the engine time the server reports for it) (plus every
table under "details"). Each benchmark measures ours and its baseline in the same run.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import ann_recall as ann
import encoder_throughput as encoder
import kernels_vs_numpy as kernels
import serving_load as serving
from benchutil import bench_bundle, host, write_json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--dtype", default="auto",
                   help="encoder precision for benchmarks 2-4 (in process and served): auto, float32, bfloat16, int8")
    args = p.parse_args()
    bundle = args.bundle or bench_bundle()
    started = time.perf_counter()
    details = {}
    cpu = host()
    print(f"== bundle {bundle} on {cpu['cpu_model'] or platform.machine()} ({cpu['cores']} cores), native bf16 "
          f"{'yes' if cpu['native_bf16'] else 'no'}, flags {' '.join(cpu['cpu_flags'])}"
          f"{', limits ' + str(cpu['isa_limits']) if cpu['isa_limits'] else ''}; quick={args.quick}")
    details["kernels"] = kernels.run(bundle)
    print("\n== 6. kernels vs numpy twins")
    print(kernels.table(details["kernels"]["rows"], ["kernel", "numba_ms", "numpy_ms", "speedup"]))
    details["encoder"] = encoder.run(bundle, "cpu", args.quick)
    print("\n== 1. encoder throughput")
    print(encoder.summary(details["encoder"]))
    details["ann"] = ann.run(bundle, 200_000 if args.quick else 1_000_000)
    print("\n== 5. ANN vs exact")
    print(ann.table(details["ann"]["rows"], list(details["ann"]["rows"][0])))
    details["serving"] = serving.run(bundle, args.quick, dtype=args.dtype)
    print("\n== 2-4. in-process limit, served sweep, batching on/off")
    print(serving.report(details["serving"]))
    s = details["serving"]
    headline = {
        "served_over_inprocess": s["served_over_inprocess"], "batching_gain": s["batching_gain"],
        "ann_1m_recall@100": details["ann"]["ann_1m_recall@100"], "ann_1m_speedup": details["ann"]["ann_1m_speedup"],
        "ann_n": details["ann"]["ann_n"], "kernel_speedup": details["kernels"]["kernel_speedup"],
        "startup_s": s["startup_s"], "startup_first_s": s["startup_first_s"], "served_qps_p99_50ms": s["served_qps_p99_50ms"], "rss_mb": s["rss_mb"],
        "overhead_ms": s["overhead_ms"], "backend": s["backend"], "served_qps_gain": s["served_qps_gain"],
        "served_qps_gain_fp32": s["served_qps_gain_fp32"], "overhead_paired_ms": s["overhead_paired_ms"],
    }
    out = {**headline, "quick": args.quick, "dtype": args.dtype, "served_dtype": s["served_dtype"], "bundle": str(bundle),
           "seconds": time.perf_counter() - started,
           "details": details}
    out = write_json(args.json, out, default=float)
    print("\n== headline")
    for k, v in headline.items():
        print(f"  {k:24} {v:.3f}" if isinstance(v, float) else f"  {k:24} {v}")
    print(f"  ({out['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
