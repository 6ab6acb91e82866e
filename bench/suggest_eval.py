"""Query suggestions and search-as-you-type on Home Depot, served, against a most-popular prefix trie.

    python bench/suggest_eval.py [--bundle DIR] [--queries 600] [--k 8] [--json OUT]

The query log: Home Depot's judged rows as searches (each judged row of a query counts one search of it; the data
has no timestamps), split at random (seeded) into the log (80%) and the evaluation searches (20%), so popular
queries recur as they do in real traffic and rare ones may be new. The bundle's suggestion table is built from the
log plus phrases mined from the catalog's titles. Each evaluation search (a seeded sample of --queries of them) is
typed one character at a time; at every prefix both suggesters return k completions:
- `suggest_mrr` / `trie_mrr`: mean over every (query, prefix) of 1 / the rank of the full query among the
  suggestions (0 when absent); the trie is the plain baseline: log queries that start with the prefix, most
  searched first, over the same log and the same normalisation.
- `keystrokes_saved` / `trie_keystrokes_saved`: mean over queries of the share of characters the user need not
  type: (length - the shortest prefix whose suggestions hold the query) / length.
- `suggest_p50_ms` / `suggest_p99_ms`: Suggest latency through gRPC at a steady 100 calls/s (open loop, an asyncio
  client), medians of --rounds rounds (each round's p99 in `suggest_p99_ms_rounds`).
- `ndcg10_prefix_half` / `ndcg10_full` / `ndcg10_half_plain`: Search nDCG@10 of the first half of each judged
  test query in prefix mode, of the full query, and of the half without prefix mode.

Without --bundle it uses bundles/homedepot-suggest, building it first if needed: the pipeline's `prepare` step,
a bundle with the pretrained encoder (bundles/homedepot-suggest-base: about 10 minutes on 2 cores, mostly
encoding 54k titles), then `python -m training suggest` to give it the suggestion table of this log.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from benchutil import ROOT, table, write_json

sys.path.insert(0, str(ROOT))
from common.suggest import phrase_key, read_query_log  # noqa: E402
from training.metrics import ndcg_at  # noqa: E402
from training.served import ServedBundle, pb  # noqa: E402

DEFAULT_BUNDLE = ROOT / "bundles" / "homedepot-suggest"


def data_dir() -> Path:
    return Path(os.environ.get("SEARCHREC_DATA_DIR", ROOT.parent / "shared" / "data"))


def split_searches(prepared: Path, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """(the log as query,count; the evaluation searches) from the judged rows, 80/20 at random."""
    rows = pd.read_parquet(prepared / "judgments.parquet")["query"].astype(str).tolist()
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    log = pd.Series(rows[:cut]).value_counts()
    return pd.DataFrame({"query": log.index, "count": log.to_numpy()}), rows[cut:]


def ensure_bundle(bundle: Path, seed: int) -> tuple[Path, Path]:
    """(bundle, prepared dir): build what is missing."""
    work = bundle.parent / f"{bundle.name}.work"
    prepared = work / "prepared"
    if not (prepared / "judgments.parquet").is_file():
        subprocess.run([sys.executable, "-m", "training", "prepare", "--dataset", "homedepot", "--data-dir",
                        str(data_dir()), "--work", str(work)], cwd=ROOT, check=True)
    if not (bundle / "manifest.json").is_file():
        from training.__main__ import default_encoder_dir
        from training.bundle_writer import BuildOptions, rebuild_suggest, write_bundle

        base = bundle.parent / f"{bundle.name}-base"
        if not (base / "manifest.json").is_file():
            items = pd.read_parquet(prepared / "items.parquet")
            write_bundle(items, base, BuildOptions(encoder_dir=default_encoder_dir(), name="homedepot-suggest"))
        log, _ = split_searches(prepared, seed)
        log.to_csv(work / "suggest_log.csv", index=False)
        rebuild_suggest(base, bundle, read_query_log(work / "suggest_log.csv"))
    return bundle, prepared


class Trie:
    """The baseline: log queries by prefix, most searched first (a sorted list stands in for the trie)."""

    def __init__(self, log: dict[str, float]) -> None:
        counts: dict[str, float] = {}
        for q, c in log.items():
            key = phrase_key(q)
            if key:
                counts[key] = counts.get(key, 0.0) + c
        self.texts = sorted(counts)
        self.counts = counts

    def complete(self, prefix: str, k: int) -> list[str]:
        import bisect

        lo = bisect.bisect_left(self.texts, prefix)
        hi = bisect.bisect_left(self.texts, prefix + "\U0010ffff", lo)
        return sorted(self.texts[lo:hi], key=lambda t: (-self.counts[t], t))[:k]


def typed_prefixes(query: str) -> list[str]:
    return [query[:n] for n in range(1, len(query) + 1)]


def reciprocal_rank(target: str, got: list[str]) -> float:
    return 1.0 / (got.index(target) + 1) if target in got else 0.0


def completion(stub, prefix: str, k: int) -> list[str]:
    return [s.text for s in stub.Suggest(pb.SuggestRequest(prefix=prefix, k=k), timeout=30).suggestions]


def open_loop(target: str, prefixes: list[str], rate: float, seconds: float, k: int) -> list[float]:
    """Suggest calls started at a steady rate whatever the answers do (an asyncio gRPC client: one task a call,
    no thread per call eating the cores the server runs on); latencies in ms."""
    import asyncio

    import grpc

    from training.served import pb_grpc

    async def run() -> list[float]:
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.SearchRecommendStub(channel)

            async def call(p: str) -> None:
                t = time.perf_counter()
                await stub.Suggest(pb.SuggestRequest(prefix=p, k=k), timeout=30)
                latencies.append(1000 * (time.perf_counter() - t))

            tasks = []
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(call(prefixes[i % len(prefixes)])))
            await asyncio.gather(*tasks)
        return latencies

    return asyncio.run(run())


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--prepared", type=Path, default=None, help="the prepared Home Depot folder (with --bundle)")
    ap.add_argument("--queries", type=int, default=600, help="evaluation queries sampled from the test split")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one latency round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    if args.bundle is None:
        bundle, prepared = ensure_bundle(DEFAULT_BUNDLE, args.seed)
    else:  # a bundle whose suggestion table was built from this --seed's log (python -m training suggest)
        bundle = args.bundle
        prepared = args.prepared or DEFAULT_BUNDLE.parent / f"{DEFAULT_BUNDLE.name}.work" / "prepared"
    log_frame, searches = split_searches(prepared, args.seed)
    test = pd.read_csv(prepared / "test_judgments.csv", dtype={"query": str})
    trie = Trie(dict(zip(log_frame["query"], log_frame["count"].astype(float))))
    queries = [q for q in (phrase_key(s) for s in searches) if q]
    random.Random(args.seed).shuffle(queries)
    queries = queries[: args.queries]
    seen = sum(q in trie.counts for q in queries)
    print(f"{len(queries)} evaluation searches ({seen} of them in the log); log of {len(trie.texts)} distinct "
          f"queries")

    with ServedBundle(bundle, device="cpu") as served:
        stub = served.stub
        rr_ours, rr_trie, saved_ours, saved_trie = [], [], [], []
        t0 = time.perf_counter()
        seen_flags = []
        for q in queries:
            first_ours = first_trie = None
            seen_flags += [q in trie.counts] * len(q)
            for p in typed_prefixes(q):
                ours = completion(stub, p, args.k)
                base = trie.complete(phrase_key(p) + (" " if p.endswith(" ") else ""), args.k)
                rr_ours.append(reciprocal_rank(q, ours))
                rr_trie.append(reciprocal_rank(q, base))
                if first_ours is None and q in ours:
                    first_ours = len(p)
                if first_trie is None and q in base:
                    first_trie = len(p)
            saved_ours.append((len(q) - (first_ours or len(q))) / len(q))
            saved_trie.append((len(q) - (first_trie or len(q))) / len(q))
        typed_s = time.perf_counter() - t0
        all_prefixes = [p for q in queries for p in typed_prefixes(q)]
        random.Random(args.seed + 1).shuffle(all_prefixes)
        # The load generator runs in a process of its own (only an asyncio channel in it): this process's sync
        # channel and its poller threads would otherwise share the event loop's cores and inflate the tail.
        rounds = []  # several rounds, medians quoted: single rounds of a p99 vary on a shared 2-core machine
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as gen:
            gen.submit(open_loop, served.target, all_prefixes[:200], args.rate, 2.0, args.k).result()  # warm-up
            for r in range(args.rounds):
                lat = gen.submit(open_loop, served.target,
                                 all_prefixes[r * int(args.rate * args.seconds):] or all_prefixes,
                                 args.rate, args.seconds, args.k).result()
                rounds.append((statistics.median(lat), pct(lat, 0.99), len(lat)))

        grades: dict[str, dict[str, float]] = {}
        for q, i, r in zip(test["query"].astype(str), test["item_id"].astype(str), test["relevance"]):
            grades.setdefault(q, {})[i] = float(r) - 1.0  # gain = relevance - 1, as training.evaluate counts it
        judged = sorted(grades)
        random.Random(args.seed).shuffle(judged)
        judged = judged[: args.queries]
        nd_full, nd_half, nd_plain = [], [], []
        for q in judged:
            half = q[: max(1, math.ceil(len(q) / 2))]
            ids = lambda r: [it.item_id for it in r.items]  # noqa: E731
            nd_full.append(ndcg_at(ids(stub.Search(pb.SearchRequest(query=q, k=10), timeout=60)), grades[q], 10))
            nd_half.append(ndcg_at(ids(stub.Search(pb.SearchRequest(query=half, k=10, prefix=True), timeout=60)),
                                   grades[q], 10))
            nd_plain.append(ndcg_at(ids(stub.Search(pb.SearchRequest(query=half, k=10), timeout=60)), grades[q], 10))
        info = served.info()

    result = {
        "bundle": str(bundle), "bundle_version": info.bundle_version, "queries": len(queries),
        "queries_in_log": seen, "prefixes": len(rr_ours), "k": args.k,
        "suggest_mrr": round(statistics.fmean(rr_ours), 4), "trie_mrr": round(statistics.fmean(rr_trie), 4),
        "keystrokes_saved": round(statistics.fmean(saved_ours), 4),
        "trie_keystrokes_saved": round(statistics.fmean(saved_trie), 4),
        "suggest_p50_ms": round(statistics.median(r[0] for r in rounds), 3),
        "suggest_p99_ms": round(statistics.median(r[1] for r in rounds), 3),
        "suggest_p99_ms_rounds": [round(r[1], 3) for r in rounds],
        "suggest_calls": sum(r[2] for r in rounds), "rate_calls_per_s": args.rate, "typed_seconds": round(typed_s, 1),
        "suggest_mrr_seen": _mean([r for r, f in zip(rr_ours, seen_flags) if f]),
        "trie_mrr_seen": _mean([r for r, f in zip(rr_trie, seen_flags) if f]),
        "suggest_mrr_unseen": _mean([r for r, f in zip(rr_ours, seen_flags) if not f]),
        "trie_mrr_unseen": _mean([r for r, f in zip(rr_trie, seen_flags) if not f]),
        "ndcg10_full": round(statistics.fmean(nd_full), 4), "ndcg10_prefix_half": round(statistics.fmean(nd_half), 4),
        "ndcg10_half_plain": round(statistics.fmean(nd_plain), 4), "ndcg_queries": len(judged),
        "dtype": info.dtype,
    }
    rows = [{"": "ours (Suggest, served)", "MRR": result["suggest_mrr"], "keystrokes saved": result["keystrokes_saved"]},
            {"": "most-popular prefix trie", "MRR": result["trie_mrr"],
             "keystrokes saved": result["trie_keystrokes_saved"]}]
    print(table(rows, ["", "MRR", "keystrokes saved"]))
    print(f"MRR on searches in the log: ours {result['suggest_mrr_seen']}, trie {result['trie_mrr_seen']}; on new ones: "
          f"ours {result['suggest_mrr_unseen']}, trie {result['trie_mrr_unseen']}")
    print(f"Suggest at {args.rate:g} calls/s: p50 {result['suggest_p50_ms']} ms, p99 {result['suggest_p99_ms']} ms "
          f"(medians of {args.rounds} rounds of {args.seconds:g} s; p99 per round {result['suggest_p99_ms_rounds']})")
    print(f"Search nDCG@10 on {len(judged)} judged test queries: full {result['ndcg10_full']}, first half in prefix "
          f"mode {result['ndcg10_prefix_half']}, first half as a plain query {result['ndcg10_half_plain']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
