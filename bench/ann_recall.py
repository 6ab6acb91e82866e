"""Benchmark 5: approximate search vs exact, for the index types the training package chooses
(`training.bundle_writer.build_index`: exact below 100k items; above, IVF over 4-bit fast-scan PQ
codes with exact re-scoring, nprobe and re-scoring depth tuned to recall@100 >= 0.98), at the real
53k Home Depot vectors and at N vectors (the real ones plus perturbed, re-normalised copies).

Queries are real: 1,024 Home Depot test-split queries encoded by the bundle's encoder, searched in
batches of 32 (the server's batch). The build tunes on other real queries the encoder never trained
on (512 of the rerank split, as the training pipeline does), never on these.

    python bench/ann_recall.py [--bundle DIR] [--n 1000000] [--json OUT]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchutil import bench_bundle, median_s, table, write_json


NOISE = 0.01  # per dimension: a copy sits ~0.2 (in L2) from its original, like a product variant


def grow(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The real vectors plus perturbed, re-normalised copies up to n rows."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), np.float32)
    out[:len(real)] = real
    for start in range(len(real), n, len(real)):
        end = min(n, start + len(real))
        block = real[: end - start] + rng.normal(0, NOISE, (end - start, real.shape[1])).astype(np.float32)
        out[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def measure(vectors: np.ndarray, queries: np.ndarray, tuning: np.ndarray, k: int = 100) -> dict:
    import faiss

    from training.bundle_writer import build_index, overlap_recall

    faiss.cvar.distance_compute_blas_threshold = 1
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    t0 = time.perf_counter()
    index, params = build_index(vectors, flat_max_items=100_000, queries=tuning)
    build_s = time.perf_counter() - t0
    batches = [queries[i:i + 32] for i in range(0, len(queries), 32)]
    exact_s = median_s(lambda: [exact.search(b, k) for b in batches], repeat=3)
    ann_s = median_s(lambda: [index.search(b, k) for b in batches], repeat=3)
    truth = np.concatenate([exact.search(b, k)[1] for b in batches])
    found = np.concatenate([index.search(b, k)[1] for b in batches])
    return {"n": len(vectors), "index": params["type"], "nprobe": params.get("nprobe"),
            "k_factor": params.get("k_factor"), "tuned_recall": params.get("recall@100_vs_exact"), "build_s": build_s,
            "recall@100": overlap_recall(truth, found), "exact_qps": len(queries) / exact_s,
            "ann_qps": len(queries) / ann_s, "speedup": exact_s / ann_s}


def query_vectors(bundle_dir: Path, n: int = 1024, split: str = "rerank") -> np.ndarray:
    """Real queries encoded by the bundle's encoder (Home Depot queries of a split, else title prefixes)."""
    from common.encoding import TextEncoder
    from serving_load import queries

    qs = (queries(bundle_dir, n, split) * 2)[:n]
    return TextEncoder(bundle_dir / "encoder", device="cpu", dtype="float32").encode(qs, batch_size=64).astype(np.float32)


def run(bundle_dir: Path, n: int) -> dict:
    real = np.load(bundle_dir / "item_vectors.npy").astype(np.float32)
    q = query_vectors(bundle_dir, 1024, split="test")
    tuning = query_vectors(bundle_dir, 512, split="rerank")
    rows = [measure(real, q, tuning)]
    if n > len(real):
        rows.append(measure(grow(real, n), q, tuning))
    big = rows[-1]
    return {"rows": rows, "ann_1m_recall@100": big["recall@100"], "ann_1m_speedup": big["speedup"], "ann_n": big["n"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    res = run(args.bundle or bench_bundle(), args.n)
    print("ANN vs exact (1024 real encoded test-split queries in batches of 32; tuned on 512 others; medians)")
    print(table(res["rows"], ["n", "index", "nprobe", "k_factor", "tuned_recall", "build_s", "recall@100", "exact_qps",
                              "ann_qps", "speedup"]))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
