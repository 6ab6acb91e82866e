"""`python -m training evaluate recommend`: the served Recommend against baselines, in one run.

The bundle is served by a real server process (`training.served`) and every test user is asked for
through Recommend(user_id, k) — the bundle's stored history for that user plus the same model,
kernels and exclusion rules as production. Baselines are computed here over the same histories:
popularity, item-kNN (cosine over the user x item matrix) and, where people re-buy, each user's most
often bought past items.

Protocols:
- leave_one_out (Beauty, sequence files): the held-out last item of each user with >= 3 items,
  full ranking over all items; Recall@5/10/20 and NDCG@5/10/20.
- temporal (Online Retail): users active both before and after the cut-off; the relevant set is
  every distinct item they bought after it; Recall@k = hits / |relevant|, NDCG@k with binary gains.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from training.behaviour import Behaviour, temporal_split

log = logging.getLogger(__name__)

KS = (5, 10, 20)
# TIGER paper (NeurIPS 2023), Table 1, Amazon Beauty, full ranking, leave-one-out.
PUBLISHED_BEAUTY = {
    "SASRec (published)": {"recall@5": 0.0387, "ndcg@5": 0.0249, "recall@10": 0.0605, "ndcg@10": 0.0318},
    "S3-Rec (published)": {"recall@5": 0.0387, "ndcg@5": 0.0244, "recall@10": 0.0647, "ndcg@10": 0.0327},
    "TIGER (published)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
}


def metrics_at(ranked: list[list[int]], relevant: list[set[int]], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k (hits / |relevant|) and NDCG@k (binary gains) averaged over users."""
    out: dict[str, float] = {}
    for k in ks:
        rec, ndcg = [], []
        for r, rel in zip(ranked, relevant):
            top = r[:k]
            hits = [1.0 if x in rel else 0.0 for x in top]
            rec.append(sum(hits) / len(rel))
            dcg = sum(h / np.log2(i + 2) for i, h in enumerate(hits))
            ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(rel), k)))
            ndcg.append(dcg / ideal)
        out[f"recall@{k}"] = float(np.mean(rec)) if rec else 0.0
        out[f"ndcg@{k}"] = float(np.mean(ndcg)) if ndcg else 0.0
    return out


def test_cases(b: Behaviour, split: dict[str, Any]) -> tuple[list[int], list[list[int]], list[set[int]]]:
    """(user indices, their served histories, their relevant item rows)."""
    users, hist, rel = [], [], []
    if split["kind"] == "leave_one_out":
        for u, s in enumerate(b.sequences):
            if len(s) >= 3:
                users.append(u), hist.append(s[:-1]), rel.append({s[-1]})
    elif split["kind"] == "temporal":
        before, after = temporal_split(b, int(split["cutoff"]))
        for u, (h, a) in enumerate(zip(before, after)):
            if h and a:
                users.append(u), hist.append(h), rel.append(set(a))
    else:
        raise ValueError(f"bundle split {split['kind']!r} holds nothing out; build with --dataset to evaluate")
    return users, hist, rel


def _top(scores: np.ndarray, hist: list[int], k: int, exclude_seen: bool) -> list[int]:
    s = scores.astype(np.float64).copy()
    if exclude_seen and hist:
        s[hist] = -np.inf
    top = np.argpartition(-s, k)[:k]
    return top[np.argsort(-s[top], kind="stable")].tolist()


def popularity_baseline(hists: list[list[int]], all_hists: list[list[int]], n: int, k: int, exclude_seen: bool) -> list[list[int]]:
    pop = np.zeros(n)
    for h in all_hists:
        np.add.at(pop, h, 1.0)
    return [_top(pop, h, k, exclude_seen) for h in hists]


def item_knn_baseline(hists: list[list[int]], all_hists: list[list[int]], n: int, k: int, exclude_seen: bool,
                      neighbours: int = 100) -> list[list[int]]:
    rows = np.repeat(np.arange(len(all_hists)), [len(h) for h in all_hists])
    cols = np.fromiter((i for h in all_hists for i in h), dtype=np.int64, count=len(rows))
    x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(all_hists), n))
    x.data[:] = 1.0
    x.sum_duplicates()
    x.data[:] = 1.0
    norms = np.sqrt(np.asarray(x.sum(0)).ravel()) + 1e-9
    sim = (x.T @ x).tocsr().astype(np.float64)
    sim = sparse.diags(1 / norms) @ sim @ sparse.diags(1 / norms)
    sim.setdiag(0)
    sim = sim.tocsr()
    # keep each item's strongest neighbours (classic item-kNN)
    sim_rows = []
    for i in range(n):
        lo, hi = sim.indptr[i], sim.indptr[i + 1]
        if hi - lo > neighbours:
            keep = np.argpartition(-sim.data[lo:hi], neighbours)[:neighbours]
            sim_rows.append((np.full(neighbours, i), sim.indices[lo:hi][keep], sim.data[lo:hi][keep]))
        else:
            sim_rows.append((np.full(hi - lo, i), sim.indices[lo:hi], sim.data[lo:hi]))
    r = np.concatenate([a for a, _, _ in sim_rows])
    c = np.concatenate([b for _, b, _ in sim_rows])
    v = np.concatenate([d for _, _, d in sim_rows])
    sim = sparse.csr_matrix((v, (r, c)), shape=(n, n))
    pop = np.asarray(x.sum(0)).ravel()
    out = []
    for h in hists:
        u = np.zeros(n)
        np.add.at(u, h, 1.0)
        scores = sim.T @ u + 1e-6 * pop / max(pop.max(), 1)  # popularity breaks ties among unscored items
        out.append(_top(scores, h, k, exclude_seen))
    return out


def past_items_baseline(hists: list[list[int]], all_hists: list[list[int]], n: int, k: int) -> list[list[int]]:
    """Where people re-buy: each user's most often bought items, then the most popular ones."""
    pop = np.zeros(n)
    for h in all_hists:
        np.add.at(pop, h, 1.0)
    out = []
    for h in hists:
        s = pop / (pop.max() + 1.0)  # < 1: any past item outranks every item never bought
        if h:
            np.add.at(s, h, 1.0)
        out.append(_top(s, [], k, False))
    return out


def served_rankings(bundle: Path, user_ids: list[str], k: int, device: str = "auto", workers: int = 32) -> tuple[list[list[str]], dict]:
    """Recommend(user_id, k) for every user through a real server process."""
    from training.served import ServedBundle

    with ServedBundle(bundle, device=device, extra_args=("--max-batch-size", "64")) as served:
        from training.served import pb

        def ask(user: str) -> list[str]:
            resp = served.stub.Recommend(pb.RecommendRequest(user_id=user, k=k), timeout=120)
            return [it.item_id for it in resp.items]

        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(ask, user_ids))
        seconds = time.perf_counter() - started
        info = {"startup_s": round(served.startup_s, 2), "requests": len(user_ids), "seconds": round(seconds, 1),
                "requests_per_s": round(len(user_ids) / max(seconds, 1e-9), 1), "version": served.version}
    return out, info


def evaluate_recommend(bundle: Path, b: Behaviour, device: str = "auto") -> dict[str, Any]:
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    spec = manifest.get("recommender")
    if not spec:
        raise ValueError(f"{bundle}: this bundle has no recommender")
    split = spec["split"]
    users, hists, rel = test_cases(b, split)
    ks = KS
    kmax = max(ks)
    row = {i: r for r, i in enumerate(b.items["item_id"])}
    ids, info = served_rankings(Path(bundle), [b.users[u] for u in users], kmax, device)
    unknown = sum(1 for r in ids for i in r if i not in row)
    served = [[row.get(i, -1) for i in r] for r in ids]
    n = len(b.items)
    exclude_seen = not spec.get("allow_repeats", False)
    all_hists = [s[:-1] if split["kind"] == "leave_one_out" and len(s) >= 3 else s for s in b.sequences]
    if split["kind"] == "temporal":
        all_hists, _ = temporal_split(b, int(split["cutoff"]))
    t0 = time.perf_counter()
    results: dict[str, Any] = {"bundle": metrics_at(served, rel, ks)}
    results["popularity"] = metrics_at(popularity_baseline(hists, all_hists, n, kmax, exclude_seen), rel, ks)
    results["item_knn"] = metrics_at(item_knn_baseline(hists, all_hists, n, kmax, exclude_seen), rel, ks)
    if not exclude_seen:
        results["past_items"] = metrics_at(past_items_baseline(hists, all_hists, n, kmax), rel, ks)
    if b.source == "amazon_beauty":
        results.update(PUBLISHED_BEAUTY)
    results["meta"] = {"users": len(users), "items": n, "protocol": split, "exclude_seen": exclude_seen,
                       "served": info, "unknown_ids_returned": unknown, "baselines_s": round(time.perf_counter() - t0, 1),
                       "bundle_version": manifest.get("bundle_version")}
    return results


def format_table(results: dict[str, Any]) -> str:
    keys = [k for k in results["bundle"]]
    names = [n for n in results if n != "meta"]
    width = max(len(n) for n in names) + 2
    lines = [" " * width + " ".join(f"{k:>10}" for k in keys)]
    for n in names:
        lines.append(f"{n:<{width}}" + " ".join(f"{results[n][k]:>10.4f}" if k in results[n] else f"{'':>10}" for k in keys))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One bar group per dataset: Recall@10 and NDCG@10 of every system in its results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (title, res) in zip(axes[0], results.items()):
        names = [n for n in res if n != "meta"]
        keys = [k for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20") if k in res["bundle"]]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [res[n].get(k, 0.0) for k in keys]
            ax.bar(np.arange(len(keys)) + i * width, vals, width, label=n)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
