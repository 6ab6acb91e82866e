"""What classification costs when served: the Classify RPC and Search's `classify_query`, each beside its
baseline in the same run (one server process, closed-loop gRPC clients, medians of repeated rounds).

    python bench/classify_serving.py [--bundle DIR] [--seconds 5] [--rounds 3] [--json OUT]

- Search with `classify_query` vs the same Search without it, one client: the added latency (the query's
  category is computed in the classify batcher beside the search).
- Classify, one query a call, 1 and 8 clients: calls/s and latency (8 clients: requests share batches).
- Classify, 32 items a call, served vs the same engine in this process on the same texts (batches of 32, the
  torch threads of one server compute thread): items/s and the served share of the in-process rate; and that
  engine vs the training side's eager network (`Classifier.predict_proba`, autocast) on the same texts.

Without --bundle it uses bundles/sample-classifier, building it first if needed (the sample catalog with a
classifier trained on its own categories, 4 epochs). The network's cost does not depend on the taxonomy;
the TF-IDF SVM's grows with the number of categories (see the bundle's line in the output).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchutil import ROOT, run_closed_loop, table, write_json

DEFAULT_BUNDLE = ROOT / "bundles" / "sample-classifier"


def ensure_bundle() -> Path:
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "training", "build", "--catalog", "training/sample/catalog.jsonl",
                        "--out", str(DEFAULT_BUNDLE), "--name", "sample-classifier", "--device", "cpu",
                        "--classifier", "--classifier-epochs", "4"], cwd=ROOT, check=True)
    return DEFAULT_BUNDLE


def closed_loop(call, n_inputs: int, clients: int, seconds: float) -> dict:
    row = run_closed_loop(call, n_inputs, clients, seconds)
    row["calls_per_s"] = row.pop("qps")
    return row


def median_row(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) if isinstance(rows[0][k], float) else rows[0][k]
            for k in rows[0]}


def run(bundle: Path, seconds: float, rounds: int) -> dict:
    import pandas as pd

    from common.classifier import Classifier, item_text
    from training.served import ServedBundle, pb

    items = pd.read_parquet(bundle / "items.parquet")
    titles = [item_text(t, b) for t, b in zip(items["title"].astype(str), items["brand"].astype(str))]
    queries = sorted({" ".join(t.split()[:3]) for t in items["title"].astype(str)})
    groups = [titles[i: i + 32] for i in range(0, len(titles) - 31, 32)]
    result: dict = {"bundle": str(bundle), "seconds": seconds, "rounds": rounds}
    with ServedBundle(bundle, device="cpu") as srv:
        info = srv.info()
        if not info.classifier:
            raise SystemExit(f"{bundle}: the bundle has no classifier (build it with --classifier)")
        result.update(categories=info.classifier_categories, served_dtype=info.dtype)
        stub = srv.stub

        def search(i, classify=False):
            stub.Search(pb.SearchRequest(query=queries[i], k=10, classify_query=classify), timeout=10)

        def classify_one(i):
            stub.Classify(pb.ClassifyRequest(queries=[queries[i]], k=3), timeout=10)

        def classify_32(i):
            stub.Classify(pb.ClassifyRequest(items=[pb.ClassifyItem(title=t) for t in groups[i]], k=1), timeout=30)

        for fn, n in ((search, len(queries)), (classify_one, len(queries)), (classify_32, len(groups))):
            closed_loop(fn, n, 2, 1.0)  # connections up, caches warm
        plan = {"search": (search, len(queries), 1), "search_classify": (lambda i: search(i, True), len(queries), 1),
                "classify_1": (classify_one, len(queries), 1), "classify_8_clients": (classify_one, len(queries), 8),
                "classify_32_items": (classify_32, len(groups), 1)}
        measured: dict[str, list[dict]] = {k: [] for k in plan}
        for _ in range(rounds):  # interleaved: a slow moment of the machine hits every variant alike
            for name, (fn, n, clients) in plan.items():
                measured[name].append(closed_loop(fn, n, clients, seconds))
        rows = {k: median_row(v) for k, v in measured.items()}
    # In process, with the torch threads one compute thread of the server gets: the served engine
    # (ServedClassifier: traced encoder, numpy head) and the training side's eager network (autocast).
    import torch

    from common.bundle_format import read_manifest
    from server.classify import ServedClassifier
    from server.config import ServerConfig, compute_plan

    _workers, threads = compute_plan(ServerConfig(bundle=bundle))
    torch.set_num_threads(threads)
    engine = ServedClassifier.load(bundle, read_manifest(bundle)["files"], "cpu", result["served_dtype"], None)
    eager = Classifier.load(bundle, bf16=result["served_dtype"] == "bfloat16")
    rates = {}
    for name, fn in (("engine", engine.probabilities), ("eager", eager.predict_proba)):
        fn(titles[:64])
        per_round = []
        for _ in range(rounds):
            t0, done = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                fn(groups[done % len(groups)])
                done += 1
            per_round.append(done * 32 / (time.perf_counter() - t0))
        rates[name] = statistics.median(per_round)
    same = np.mean(engine.probabilities(titles).argmax(1) == eager.predict_proba(titles).argmax(1))
    in_process = rates["engine"]
    result.update(torch_threads=threads, in_process_eager_items_per_s=rates["eager"],
                  engine_over_eager=rates["engine"] / rates["eager"], engine_eager_top1_agreement=float(same))
    served_items = rows["classify_32_items"]["calls_per_s"] * 32
    result.update(
        rows=rows, in_process_items_per_s=in_process, served_items_per_s=served_items,
        served_over_in_process=served_items / in_process,
        search_classify_added_p50_ms=rows["search_classify"]["p50_ms"] - rows["search"]["p50_ms"],
        search_classify_p50_ratio=rows["search_classify"]["p50_ms"] / rows["search"]["p50_ms"],
        classify_p50_ms=rows["classify_1"]["p50_ms"],
        classify_batching_gain=rows["classify_8_clients"]["calls_per_s"] / rows["classify_1"]["calls_per_s"])
    return result


def report(res: dict) -> str:
    rows = [{"variant": k, **v} for k, v in res["rows"].items()]
    return "\n".join([
        f"{res['bundle']}: {res['categories']} categories, encoder precision {res['served_dtype']}; "
        f"medians of {res['rounds']} rounds of {res['seconds']:.0f} s",
        table(rows, ["variant", "clients", "calls_per_s", "p50_ms", "p99_ms", "errors"]), "",
        f"Search + classify_query vs Search: p50 +{res['search_classify_added_p50_ms']:.1f} ms "
        f"(x{res['search_classify_p50_ratio']:.2f})",
        f"Classify, 1 query a call: p50 {res['classify_p50_ms']:.1f} ms; 8 clients / 1 client calls/s: "
        f"{res['classify_batching_gain']:.2f}x",
        f"Classify, 32 items a call: {res['served_items_per_s']:.0f} items/s served vs "
        f"{res['in_process_items_per_s']:.0f} in process, same engine and {res['torch_threads']} torch thread(s) "
        f"(served / in process {res['served_over_in_process']:.2f})",
        f"the served engine (traced encoder, numpy head) vs the training side's eager network: "
        f"{res['in_process_items_per_s']:.0f} vs {res['in_process_eager_items_per_s']:.0f} items/s "
        f"({res['engine_over_eager']:.2f}x), same top category for {100 * res['engine_eager_top1_agreement']:.1f}% "
        f"of the catalog's items"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    res = run(args.bundle or ensure_bundle(), args.seconds, args.rounds)
    print(report(res))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
