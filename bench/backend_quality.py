"""Encoder backends side by side: served search quality on the Home Depot test split, query-vector
parity with torch fp32, and the encoder's own speed, all in one run.

    python bench/backend_quality.py [--bundle DIR] [--json OUT]

For each (backend, precision) -- torch float32 (the reference), torch bfloat16 (the CPU default before
the onnx backend, on CPUs with native bf16), onnx float32, onnx int8 -- a real server serves the bundle
with `--backend B --dtype D`, and every judged test query is searched over gRPC (k = 100): nDCG@10,
Recall@100 and judged-only nDCG@10 as `python -m training evaluate search` computes them. In process,
the same encoder encodes the test queries one at a time: cosine of each query vector to torch fp32's
(min and mean) and the median ms per query. `ndcg10_delta` is each row's nDCG@10 minus torch fp32's;
the issue's bound is 0.005.

Without --bundle it uses bundles/homedepot-suggest (built first if missing, as bench/suggest_eval.py does).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchutil import host, table, write_json
from suggest_eval import DEFAULT_BUNDLE, ensure_bundle

CONFIGS = (("torch", "float32"), ("torch", "bfloat16"), ("onnx", "float32"), ("onnx", "int8"))


def encoder_rows(bundle: Path, queries: list[str], cache: Path) -> dict[tuple[str, str], dict]:
    import torch

    from common.encoding import TextEncoder
    from server.bundle import load_bundle

    b = load_bundle(bundle)
    torch.set_num_threads(1)  # as each of the server's two compute threads runs
    out, ref = {}, None
    for backend, dtype in CONFIGS:
        enc = TextEncoder(b.encoder_dir, dtype=dtype, backend=backend, trace=True, graph_cache=cache, threads=1)
        enc.encode(queries[:20], batch_size=1)
        times, vecs = [], []
        for q in queries:
            t0 = time.perf_counter()
            vecs.append(enc.encode([q], batch_size=1)[0])
            times.append(time.perf_counter() - t0)
        v = np.stack(vecs)
        ref = v if ref is None else ref
        cos = (v * ref).sum(1)
        out[(backend, dtype)] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                                 "encode_ms": 1000 * float(np.median(times))}
    return out


def main() -> None:
    from training.evaluate import load_eval_judgments, score_system
    from training.served import ServedBundle
    import json
    import pandas as pd
    import tempfile

    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    bundle, prepared = (args.bundle, None) if args.bundle else ensure_bundle(DEFAULT_BUNDLE, 7)
    judgments = (prepared or bundle.parent / f"{bundle.name}.work" / "prepared") / "test_judgments.csv"
    items = pd.read_parquet(bundle / "items.parquet")
    aliases = bundle / "aliases.json"
    data = load_eval_judgments(judgments, set(items["item_id"]),
                               json.loads(aliases.read_text()) if aliases.is_file() else {})
    cache = Path(tempfile.mkdtemp(prefix="searchrec-bench-backends-"))
    enc = encoder_rows(bundle, data.queries, cache)
    rows = []
    for backend, dtype in CONFIGS:
        with ServedBundle(bundle, extra_args=("--backend", backend, "--dtype", dtype, "--encoder-cache", str(cache),
                                              "--ads-slots", "0")) as served:
            res = score_system(f"{backend}/{dtype}", data, lambda q: [i.item_id for i in served.search(q, 100).items],
                               lambda q, ids: [i.item_id for i in served.search(q, len(ids), item_ids=ids).items])
            info = served.info()
        rows.append({"backend": info.backend, "dtype": info.dtype, "ndcg@10": res["ndcg@10"],
                     "recall@100": res["recall@100"], "judged_ndcg@10": res["judged_ndcg@10"],
                     "served_ms": res["latency_ms"], **enc[(backend, dtype)]})
    for r in rows:
        r["ndcg10_delta"] = r["ndcg@10"] - rows[0]["ndcg@10"]
    print(table(rows, ["backend", "dtype", "ndcg@10", "ndcg10_delta", "recall@100", "judged_ndcg@10", "served_ms",
                       "cos_min", "cos_mean", "encode_ms"]))
    if args.json:
        write_json(args.json, {"bundle": str(bundle), "judgments": str(judgments), "queries": len(data.queries),
                               "host": host(), "rows": rows})


if __name__ == "__main__":
    main()
