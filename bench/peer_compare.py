"""searchrec against a real peer in one run: txtai (an embedded semantic-search engine) with the same
MiniLM model on the Home Depot test split.

    python bench/peer_compare.py [--bundle DIR] [--json OUT] [--seconds 10]

Installs its own optional requirements first (bench/requirements-peer.txt, constrained to this project's
pins so nothing of ours moves). Then, over the same catalog (the bundle's items, each indexed by txtai from
the same passage text our encoder indexes: title, brand, category, description):

- ours: the bundle served by a real `python -m server` with its defaults (ONNX Runtime int8 encoder,
  dense + lexical candidates, reranker), queried over gRPC;
- txtai BM25 (`keyword=True`), dense (`path=MiniLM`, a Flat FAISS index) and hybrid (`hybrid=True`:
  BM25 + dense, txtai's default fusion), in process (no network: the peer's best case).

Quality: nDCG@10 over the full ranking and Recall@100 (relevance >= 2.5) on every judged test query.
Speed: single-query q/s and p50/p99 ms at one client (sequential calls, k = 10, `--seconds` each), and batch
q/s: ours at 32 closed-loop gRPC clients (the server batches them), txtai's `batchsearch` of 32 queries.
Keys: ours_ndcg10, peer_best_ndcg10, ours_qps_1, peer_best_qps_1, ours_p99_ms (plus every row).

Without --bundle it uses bundles/homedepot-suggest (built first if missing, as bench/suggest_eval.py does).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchutil import ROOT, host, run_closed_loop, table, write_json
from suggest_eval import DEFAULT_BUNDLE, ensure_bundle

REQUIREMENTS = ROOT / "bench" / "requirements-peer.txt"


def install_peer() -> None:
    """pip-install txtai into this interpreter's environment, held to requirements.txt's pins."""
    try:
        import txtai  # noqa: F401
        return
    except ImportError:
        pass
    pins = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    cons = ROOT / ".venv" / "peer-constraints.txt" if (ROOT / ".venv").is_dir() else Path("/tmp/peer-constraints.txt")
    cons.write_text("\n".join(p for p in pins if p) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS), "-c", str(cons)], check=True)


def quality(rank, data) -> dict:
    from training.evaluate import RELEVANT_AT, TOP
    from training.metrics import ndcg_at, recall_at

    ndcgs, recalls = [], []
    for q in data.queries:
        grades = data.grades[q]
        ranked = rank(q)
        ndcgs.append(ndcg_at(ranked, {i: g - 1.0 for i, g in grades.items()}, 10))
        relevant = [i for i, g in grades.items() if g >= RELEVANT_AT]
        if relevant:
            recalls.append(recall_at(ranked, relevant, TOP))
    return {"ndcg@10": float(np.mean(ndcgs)), "recall@100": float(np.mean(recalls))}


def single(call, queries: list[str], seconds: float) -> dict:
    """Sequential calls over the queries for `seconds`: q/s, p50, p99."""
    times, i, stop = [], 0, time.monotonic() + seconds
    t_all = time.perf_counter()
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        call(queries[i % len(queries)])
        times.append(time.perf_counter() - t0)
        i += 1
    wall = time.perf_counter() - t_all
    return {"qps_1": len(times) / wall, "p50_ms": 1000 * float(np.median(times)),
            "p99_ms": 1000 * float(np.percentile(times, 99))}


def batch_qps(call_batch, queries: list[str], seconds: float, size: int = 32) -> float:
    n, i, stop = 0, 0, time.monotonic() + seconds
    t0 = time.perf_counter()
    while time.monotonic() < stop:
        chunk = [queries[(i + j) % len(queries)] for j in range(size)]
        call_batch(chunk)
        n += size
        i += size
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--json", type=Path)
    p.add_argument("--seconds", type=float, default=10.0, help="per speed measurement")
    args = p.parse_args()
    install_peer()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the peer loads the model from its local folder, never a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import pandas as pd
    from txtai import Embeddings

    from server.bundle import load_bundle
    from training.bundle_writer import passage_text
    from training.evaluate import TOP, load_eval_judgments
    from training.served import ServedBundle, pb

    bundle, prepared = (args.bundle, None) if args.bundle else ensure_bundle(DEFAULT_BUNDLE, 7)
    judgments = (prepared or bundle.parent / f"{bundle.name}.work" / "prepared") / "test_judgments.csv"
    items = pd.read_parquet(bundle / "items.parquet")
    text_cols = ["title", "brand", "category", "description"]
    items[text_cols] = items[text_cols].fillna("")
    aliases = bundle / "aliases.json"
    data = load_eval_judgments(judgments, set(items["item_id"]),
                               json.loads(aliases.read_text()) if aliases.is_file() else {})
    queries = data.queries
    loaded_bundle = load_bundle(bundle)
    model = str(loaded_bundle.encoder_dir)  # the bundle's MiniLM: the same weights for both engines
    maxlength = int(loaded_bundle.encoder.get("max_length", 128))  # and the same truncation of passages
    rows = []

    with ServedBundle(bundle, extra_args=("--ads-slots", "0")) as srv:
        info = srv.info()
        q = quality(lambda s: [i.item_id for i in srv.search(s, TOP).items], data)
        speed = single(lambda s: srv.stub.Search(pb.SearchRequest(query=s, k=10), timeout=10), queries, args.seconds)
        loaded = run_closed_loop(lambda i: srv.stub.Search(pb.SearchRequest(query=queries[i % len(queries)], k=10),
                                                           timeout=10), len(queries), 32, args.seconds)
        rows.append({"system": f"searchrec served ({info.backend} {info.dtype})", **q, **speed,
                     "batch_qps": loaded["qps"], "index_s": float("nan")})
    print(table(rows, list(rows[0])), flush=True)

    docs = [(iid, text, None) for iid, text in zip(items["item_id"], items.apply(passage_text, axis=1))]
    configs = {"txtai bm25": dict(keyword=True), "txtai dense": dict(path=model, maxlength=maxlength, content=False),
               "txtai hybrid": dict(path=model, maxlength=maxlength, hybrid=True, content=False)}
    for name, cfg in configs.items():
        emb = Embeddings(**cfg)
        t0 = time.perf_counter()
        emb.index(docs)
        index_s = time.perf_counter() - t0
        q = quality(lambda s: [str(i) for i, _ in emb.search(s, TOP)], data)
        speed = single(lambda s: emb.search(s, 10), queries, args.seconds)
        bq = batch_qps(lambda chunk: emb.batchsearch(chunk, 10), queries, args.seconds)
        rows.append({"system": name, **q, **speed, "batch_qps": bq, "index_s": index_s})
        print(table(rows[-1:], list(rows[0])), flush=True)
    ours, peers = rows[0], rows[1:]
    res = {
        "ours_ndcg10": ours["ndcg@10"], "peer_best_ndcg10": max(r["ndcg@10"] for r in peers),
        "ours_recall100": ours["recall@100"], "peer_best_recall100": max(r["recall@100"] for r in peers),
        "ours_qps_1": ours["qps_1"], "peer_best_qps_1": max(r["qps_1"] for r in peers),
        "ours_p99_ms": ours["p99_ms"], "ours_batch_qps": ours["batch_qps"],
        "peer_best_batch_qps": max(r["batch_qps"] for r in peers),
        "rows": rows, "queries": len(queries), "items": len(items), "bundle": str(bundle), "host": host(),
        "seconds": args.seconds,
    }
    print("\n" + table(rows, ["system", "ndcg@10", "recall@100", "qps_1", "p50_ms", "p99_ms", "batch_qps", "index_s"]))
    print(f"\nnDCG@10 ours {res['ours_ndcg10']:.4f} vs best peer {res['peer_best_ndcg10']:.4f}; single-query q/s ours "
          f"{res['ours_qps_1']:.1f} vs best peer {res['peer_best_qps_1']:.1f} "
          f"({res['ours_qps_1'] / res['peer_best_qps_1']:.2f}x); ours p99 {res['ours_p99_ms']:.2f} ms")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
