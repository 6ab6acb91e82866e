"""Exact dense search at small batches: the fp32 FAISS index (one BLAS product) against the two
small-batch twins the server can use (`server.bundle.small_batch_index`): an fp16 copy scanned query by
query, and 4-bit fast-scan PQ codes whose best 16 x k candidates are re-scored exactly against the
flat index (what bundles of >= 10,000 items use). Per batch size, in one run, with the top-100 overlap
against the exact search, over real queries (Home Depot test split when the data is there).

    python bench/scan_small_batches.py [--bundle DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchutil import bench_bundle, median_s, table, write_json  # importing benchutil puts the project on sys.path


def run(bundle_dir: Path, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), repeat: int = 15) -> dict:
    import faiss

    from common.encoding import TextEncoder
    from serving_load import queries as real_queries
    from server.bundle import FAST_SCAN_BATCH_MAX, FAST_SCAN_K_FACTOR, fp16_scan_index, load_bundle, small_batch_index
    from training.bundle_writer import overlap_recall

    bundle = load_bundle(bundle_dir)
    if bundle.index_type != "flat_ip":
        raise SystemExit(f"{bundle_dir}: index type {bundle.index_type} is not exact; nothing to compare")
    faiss.cvar.distance_compute_blas_threshold = 1  # as server.retrieval sets it
    fp16 = fp16_scan_index(bundle.vectors)
    t0 = time.perf_counter()
    fast, fast_batch_max = small_batch_index(bundle.index, bundle.vectors)  # what load_bundle builds, timed
    train_s = time.perf_counter() - t0
    if fast_batch_max != FAST_SCAN_BATCH_MAX:
        raise SystemExit(f"{bundle_dir}: {len(bundle.items)} items are below FAST_SCAN_MIN_ITEMS; no fast-scan codes")
    enc = TextEncoder(bundle.encoder_dir, device="cpu", dtype="float32")
    texts = real_queries(bundle_dir, 512, "test")
    queries = enc.encode(texts, batch_size=64)
    exact = bundle.index.search(queries, 100)[1]
    rows = []
    for nq in sizes:
        q = np.ascontiguousarray(queries[:nq])
        flat_s = median_s(lambda: bundle.index.search(q, 100), repeat)
        fp16_s = median_s(lambda: fp16.search(q, 100), repeat)
        fast_s = median_s(lambda: fast.search(q, 100), repeat)
        rows.append({"queries": nq, "fp32_blas_ms": 1000 * flat_s, "fp16_scan_ms": 1000 * fp16_s,
                     "fastscan_refine_ms": 1000 * fast_s, "fp16_speedup": flat_s / fp16_s,
                     "fastscan_speedup": flat_s / fast_s})
    overlap = {"fp16_scan": overlap_recall(exact, fp16.search(queries, 100)[1]),
               "fastscan_refine": overlap_recall(exact, fast.search(queries, 100)[1])}
    return {"bundle": str(bundle_dir), "items": len(bundle.items), "queries": len(texts),
            "k_factor": FAST_SCAN_K_FACTOR, "fastscan_train_s": train_s, "top100_overlap": overlap, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = run(args.bundle or bench_bundle())
    print(f"{result['items']} items, {result['bundle']}; {result['queries']} real queries; medians")
    print(table(result["rows"], ["queries", "fp32_blas_ms", "fp16_scan_ms", "fastscan_refine_ms", "fp16_speedup",
                                 "fastscan_speedup"]))
    print(f"top-100 overlap with the exact search over all {result['queries']} queries: {result['top100_overlap']}; "
          f"fast-scan codes built in {result['fastscan_train_s']:.1f} s (k_factor {result['k_factor']})")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
