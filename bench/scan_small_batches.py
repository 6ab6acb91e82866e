"""Exact dense search at small batches: the fp32 FAISS index (BLAS product, the server's setting)
against the bundle's fp16 scan copy (`Bundle.scan_index`), per batch size, in one run.

Under a p99 bound the served batches are small (1-4 queries), and there an exact search is bound by
memory: each call reads every item vector. The fp16 copy reads half the bytes. This prints both
timings, their ratio and the top-100 overlap, with queries encoded from real item titles.

    python bench/scan_small_batches.py [--bundle DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchutil import bench_bundle, median_s, table  # importing benchutil puts the project on sys.path


def run(bundle_dir: Path, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32), repeat: int = 15) -> dict:
    import faiss

    from common.encoding import TextEncoder
    from server.bundle import load_bundle
    from training.bundle_writer import overlap_recall

    bundle = load_bundle(bundle_dir)
    if bundle.scan_index is None:
        raise SystemExit(f"{bundle_dir}: index type {bundle.index_type} has no fp16 scan copy (exact indexes only)")
    faiss.cvar.distance_compute_blas_threshold = 1  # as server.retrieval sets it
    enc = TextEncoder(bundle.encoder_dir, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    titles = [bundle.items.titles[i] for i in rng.choice(len(bundle.items), max(sizes), replace=False)]
    queries = enc.encode([" ".join(t.split()[:4]) for t in titles], batch_size=64)  # short, query-like
    rows = []
    for nq in sizes:
        q = np.ascontiguousarray(queries[:nq])
        flat = median_s(lambda: bundle.index.search(q, 100), repeat)
        scan = median_s(lambda: bundle.scan_index.search(q, 100), repeat)
        a, b = bundle.index.search(q, 100)[1], bundle.scan_index.search(q, 100)[1]
        overlap = overlap_recall(a, b)
        rows.append({"queries": nq, "fp32_blas_ms": 1000 * flat, "fp16_scan_ms": 1000 * scan,
                     "speedup": flat / scan, "top100_overlap": overlap})
    return {"bundle": str(bundle_dir), "items": len(bundle.items), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = run(args.bundle or bench_bundle())
    print(f"{result['items']} items, {result['bundle']}")
    print(table(result["rows"], ["queries", "fp32_blas_ms", "fp16_scan_ms", "speedup", "top100_overlap"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
