"""Benchmark 6: every numba kernel vs its numpy twin at production sizes (a batch of 32 queries over
the bench bundle: its real BM25 index, real candidates and, for trees, its LambdaMART model).

    python bench/kernels_vs_numpy.py [--bundle DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from benchutil import bench_bundle, median_s, table, write_json  # importing benchutil puts the project on sys.path


def run(bundle_dir: Path, batch: int = 32, repeat: int = 5) -> dict:
    from common.encoding import TextEncoder
    from kernels import features as K
    from kernels import recfeatures as RK
    from kernels import reference as R
    from kernels import trees as T
    from server.bundle import load_bundle
    from server.config import ServerConfig
    from server.engine import SearchEngine
    from server.ranking import _flat

    bundle = load_bundle(bundle_dir)
    enc = TextEncoder(bundle.encoder_dir, device="cpu", dtype="float32")
    engine = SearchEngine(bundle, enc, ServerConfig(bundle=bundle_dir, warmup=False))
    queries = (bundle.items.titles * 2)[:batch]
    queries = [" ".join(t.split()[:4]) for t in queries]
    tokens = [bundle.lexical.token_ids(q) for q in queries]
    q_indptr, q_flat = _flat(tokens, np.int32)
    lex = bundle.lexical
    n = len(bundle.items)
    rows = []

    def pair(name, fast, slow, check=None):
        # Run sub-millisecond kernels for at least 0.2 s each: a median of 5 runs of 30 us is noise.
        f, s = median_s(fast, repeat, min_time=0.2), median_s(slow, max(2, repeat // 2), min_time=0.2)
        rows.append({"kernel": name, "numba_ms": 1000 * f, "numpy_ms": 1000 * s, "speedup": s / f})

    bm25_args = (q_indptr, q_flat, lex.bm25_indptr, lex.bm25_indices, lex.bm25_data, n)
    pair("bm25_accumulate", lambda: K.bm25_accumulate(*bm25_args), lambda: R.bm25_accumulate(*bm25_args))
    scores = K.bm25_accumulate(*bm25_args)
    empty = np.empty(0, np.bool_)
    pair("topn_masked", lambda: [K.topn_masked(scores[i], empty, 100) for i in range(batch)],
         lambda: [R.topn_masked(scores[i], empty, 100) for i in range(batch)])
    qv = enc.encode(queries, batch_size=batch)
    dense_rows = engine.dense.search(qv, [100] * batch, [None] * batch)
    cands = [np.union1d(dense_rows[i], K.topn_masked(scores[i], empty, 100)) for i in range(batch)]
    cand_offsets, cand_items = _flat(cands, np.int64)
    _, dense_flat = _flat([bundle.vectors[c] @ qv[i] for i, c in enumerate(cands)], np.float32)
    _, lex_flat = _flat([scores[i][c] for i, c in enumerate(cands)], np.float32)
    it = bundle.items
    rf_args = (q_indptr, q_flat, cand_offsets, cand_items, dense_flat, lex_flat, lex.title_indptr, lex.title_tokens,
               it.category_id, it.brand_id, it.cat_indptr, it.cat_tokens, it.brand_indptr, it.brand_tokens, it.price,
               bundle.popularity, lex.token_is_number)
    pair("rank_features", lambda: K.rank_features(*rf_args), lambda: R.rank_features(*rf_args))
    feats = K.rank_features(*rf_args)
    w = np.ones(feats.shape[1], np.float32)
    pair("linear_scores", lambda: K.linear_scores(feats, w, np.float32(0)), lambda: R.linear_scores(feats, w, np.float32(0)))
    ks = np.full(batch, 10, np.int64)
    sc = K.linear_scores(feats, w, np.float32(0))
    pair("topk_segments", lambda: K.topk_segments(sc, cand_offsets, ks), lambda: R.topk_segments(sc, cand_offsets, ks))
    if bundle.reranker.trees is not None:
        t = bundle.reranker.trees
        targs = (feats, t["node_feature"], t["node_threshold"], t["node_left"], t["node_right"], t["node_value"], t["tree_roots"])
        pair("tree_scores", lambda: T.tree_scores(*targs), lambda: R.tree_scores(*targs))
    # Recommend features: 32 users x 200 candidates, histories of 50, over this catalog's rows.
    rng = np.random.default_rng(0)
    rc = [np.sort(rng.choice(n, 200, replace=False)).astype(np.int32) for _ in range(batch)]
    rh = [rng.integers(0, n, 50).astype(np.int32) for _ in range(batch)]
    co_lists = [np.sort(rng.choice(n, 20, replace=False)) for _ in range(n)]
    co_indptr = np.concatenate([[0], np.cumsum([len(c) for c in co_lists])]).astype(np.int64)
    ra = (np.concatenate([[0], np.cumsum([len(c) for c in rc])]).astype(np.int64), np.concatenate(rc),
          rng.normal(size=200 * batch).astype(np.float32), np.arange(0, 50 * batch + 1, 50, dtype=np.int64),
          np.concatenate(rh), rng.random(n).astype(np.float32), co_indptr, np.concatenate(co_lists).astype(np.int32),
          rng.random(int(co_indptr[-1])).astype(np.float32), it.category_id, np.log1p(np.nan_to_num(it.price)))
    pair("rec_features", lambda: RK.rec_features(*ra), lambda: R.rec_features(*ra))
    speedups = [r["speedup"] for r in rows]
    return {"bundle": str(bundle_dir), "items": n, "batch": batch, "rows": rows,
            "kernel_speedup": statistics.median(speedups), "kernel_speedup_min": min(speedups)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    res = run(args.bundle or bench_bundle())
    print(f"kernels vs numpy twins ({res['items']} items, batch {res['batch']}; medians)")
    print(table(res["rows"], ["kernel", "numba_ms", "numpy_ms", "speedup"]))
    print(f"kernel_speedup (median of ratios) {res['kernel_speedup']:.1f}x, slowest kernel {res['kernel_speedup_min']:.1f}x")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
