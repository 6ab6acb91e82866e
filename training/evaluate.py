"""`python -m training evaluate search`: search quality of a bundle beside BM25 and the zero-shot encoder.

The bundle is measured through a real server process over gRPC (see `training.served`), so the numbers
are those of the served system. Baselines are computed in the same run over the same catalog:
BM25 (bm25s, English stopwords), the pretrained MiniLM with exact search, and their reciprocal-rank
fusion. Metrics (gain = relevance - 1, unjudged products gain 0):
full-catalog nDCG@10, Recall@100 of products with relevance >= 2.5, judged-only nDCG@10 (each
query's judged products ranked among themselves; queries with >= 2 distinct grades), mean latency.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bm25s
import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common import bundle_format as bf
from common.encoding import TextEncoder
from training.bundle_writer import lexical_text, passage_text
from training.metrics import ndcg_at, recall_at
from training.served import ServedBundle

log = logging.getLogger(__name__)
RELEVANT_AT = 2.5
TOP = 100


@dataclass
class EvalSet:
    queries: list[str]
    grades: dict[str, dict[str, float]]  # query -> item_id -> relevance (1..3)
    unknown_ids: int


def load_eval_judgments(path: Path, known: set[str], aliases: dict[str, str]) -> EvalSet:
    """query,(product_uid|item_id),relevance -> EvalSet; ids the catalog lacks are counted, not used."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: judgments file not found")
    grades: dict[str, dict[str, list[float]]] = {}
    unknown = 0
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        id_col = "product_uid" if "product_uid" in (reader.fieldnames or []) else "item_id"
        if not {"query", id_col, "relevance"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected columns query,product_uid|item_id,relevance")
        for n, row in enumerate(reader, start=2):
            try:
                rel = float(row["relevance"])
            except ValueError:
                raise ValueError(f"{path}:{n}: relevance {row['relevance']!r} is not a number") from None
            if not 1 <= rel <= 3:
                raise ValueError(f"{path}:{n}: relevance {rel} outside 1..3")
            item = aliases.get(row[id_col].strip(), row[id_col].strip())
            if item not in known:
                unknown += 1
                continue
            grades.setdefault(" ".join(row["query"].split()), {}).setdefault(item, []).append(rel)
    merged = {q: {i: float(np.mean(v)) for i, v in items.items()} for q, items in grades.items()}
    return EvalSet(sorted(merged), merged, unknown)


def score_system(name: str, data: EvalSet, rank: Callable[[str], list[str]],
                 rank_judged: Callable[[str, list[str]], list[str]]) -> dict:
    """Run one system over every query; returns its metrics."""
    ndcgs, recalls, judged, latencies = [], [], [], []
    for q in tqdm(data.queries, desc=f"eval {name}", unit="q", leave=False):
        grades = data.grades[q]
        gains = {i: g - 1.0 for i, g in grades.items()}
        t0 = time.perf_counter()
        ranked = rank(q)
        latencies.append(time.perf_counter() - t0)
        ndcgs.append(ndcg_at(ranked, gains, 10))
        relevant = [i for i, g in grades.items() if g >= RELEVANT_AT]
        if relevant:
            recalls.append(recall_at(ranked, relevant, TOP))
        if len(set(grades.values())) >= 2:
            judged.append(ndcg_at(rank_judged(q, list(grades)), gains, 10))
    return {
        "ndcg@10": float(np.mean(ndcgs)),
        "recall@100": float(np.mean(recalls)) if recalls else float("nan"),
        "judged_ndcg@10": float(np.mean(judged)) if judged else float("nan"),
        "latency_ms": 1000 * float(np.mean(latencies)),
        "queries": len(ndcgs),
        "recall_queries": len(recalls),
        "judged_queries": len(judged),
    }


class BM25Baseline:
    """bm25s over the same item text as the bundle's lexical index, with bm25s's own English stopwords."""

    def __init__(self, items: pd.DataFrame) -> None:
        self.ids = items["item_id"].tolist()
        corpus = bm25s.tokenize(items.apply(lexical_text, axis=1).tolist(), stopwords="en", show_progress=False)
        self.model = bm25s.BM25()
        self.model.index(corpus, show_progress=False)
        self.vocab = self.model.vocab_dict

    def _tokens(self, query: str) -> list[str]:
        toks = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        return [t for t in toks if t in self.vocab]

    def scores(self, query: str) -> np.ndarray:
        toks = self._tokens(query)
        return self.model.get_scores(toks) if toks else np.zeros(len(self.ids), np.float32)

    def rank(self, query: str) -> list[str]:
        s = self.scores(query)
        top = np.argsort(-s, kind="stable")[:TOP]
        return [self.ids[i] for i in top if s[i] > 0]


class DenseBaseline:
    """A text encoder with exact inner-product search over item vectors (query vectors cached)."""

    def __init__(self, items: pd.DataFrame, encoder: TextEncoder, vectors: np.ndarray) -> None:
        self.ids = items["item_id"].tolist()
        self.row = {i: n for n, i in enumerate(self.ids)}
        self.encoder = encoder
        self.vectors = vectors
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self._q: dict[str, np.ndarray] = {}

    def _vec(self, query: str) -> np.ndarray:
        if query not in self._q:
            self._q[query] = self.encoder.encode([query])[0]
        return self._q[query]

    def rank(self, query: str) -> list[str]:
        return [self.ids[i] for i in self.index.search(self._vec(query)[None, :], TOP)[1][0] if i >= 0]

    def rank_judged(self, query: str, ids: list[str]) -> list[str]:
        scores = self.vectors[[self.row[i] for i in ids]] @ self._vec(query)
        return [ids[i] for i in np.argsort(-scores, kind="stable")]


class Memo:
    """Remember a ranking function's answers so fusion reuses them (latency is measured once)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.cache: dict = {}

    def __call__(self, *args):
        key = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        if key not in self.cache:
            self.cache[key] = self.fn(*args)
        return self.cache[key]


def rrf(lists: list[list[str]], k: int = 60) -> list[str]:
    """Reciprocal-rank fusion of ranked id lists."""
    score: dict[str, float] = {}
    for ranked in lists:
        for r, i in enumerate(ranked):
            score[i] = score.get(i, 0.0) + 1.0 / (k + r + 1)
    return sorted(score, key=lambda i: -score[i])[:TOP]


def zero_shot_vectors(items: pd.DataFrame, encoder: TextEncoder, cache_dir: Path | None) -> np.ndarray:
    """Pretrained-encoder item vectors, cached by encoder and item text."""
    texts = items.apply(passage_text, axis=1).tolist()
    key = hashlib.sha256(("\n".join(texts) + str(encoder.model_dir) + str(encoder.max_length)).encode()).hexdigest()[:16]
    path = cache_dir / f"zero_shot_{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False).astype(np.float32)
    with tqdm(total=len(texts), desc="encode (zero-shot)", unit="item") as bar:
        vecs = encoder.encode(texts, batch_size=128, progress=bar.update)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs.astype(np.float16))
    return vecs


def evaluate_search(bundle: Path, judgments: Path, *, pretrained: Path, device: str = "cpu",
                    cache_dir: Path | None = None, zero_shot: np.ndarray | None = None,
                    server_args: tuple[str, ...] = ()) -> dict:
    """Evaluate the served bundle and the baselines on one judgments file; returns the JSON-able result.

    server_args go to the server process as they are (e.g. ("--dtype", "int8")).
    """
    manifest = bf.read_manifest(bundle)
    items = pd.read_parquet(bundle / manifest["items"]["file"])
    aliases_file = bundle / "aliases.json"
    aliases = json.loads(aliases_file.read_text()) if aliases_file.is_file() else {}
    data = load_eval_judgments(judgments, set(items["item_id"]), aliases)
    if not data.queries:
        raise ValueError(f"{judgments}: no judged query refers to an item of this bundle")
    results: dict = {}
    with ServedBundle(bundle, device=device, extra_args=tuple(server_args)) as served:
        def served_rank(q: str) -> list[str]:
            return [it.item_id for it in served.search(q, TOP).items]

        def served_judged(q: str, ids: list[str]) -> list[str]:
            return [it.item_id for it in served.search(q, len(ids), item_ids=ids).items]

        results["bundle"] = score_system("bundle", data, served_rank, served_judged)
        results["bundle"]["version"] = served.version
        results["bundle"]["startup_s"] = served.startup_s
        results["bundle"]["server_args"] = list(server_args)
        info = served.info()
        # Which engine and precision served, on which CPU kind: figures from CPUs with and without native bf16
        # (and from one engine and another) differ.
        results["bundle"].update(device=info.device, backend=info.backend, dtype=info.dtype, native_bf16=info.native_bf16,
                                 cpu_flags=list(info.cpu_flags))

    encoder = TextEncoder(pretrained, device=device, dtype="float32")
    vectors = zero_shot if zero_shot is not None else zero_shot_vectors(items, encoder, cache_dir)
    dense = DenseBaseline(items, encoder, vectors)
    bm25 = BM25Baseline(items)

    def bm25_judged(q: str, ids: list[str]) -> list[str]:
        s = bm25.scores(q)[[dense.row[i] for i in ids]]
        return [ids[j] for j in np.argsort(-s, kind="stable")]

    bm25_rank, bm25_judged = Memo(bm25.rank), Memo(bm25_judged)
    dense_rank, dense_judged = Memo(dense.rank), Memo(dense.rank_judged)
    results["bm25"] = score_system("bm25", data, bm25_rank, bm25_judged)
    results["zero_shot"] = score_system("zero_shot", data, dense_rank, dense_judged)
    results["rrf_bm25_zero_shot"] = score_system(
        "rrf", data, lambda q: rrf([bm25_rank(q), dense_rank(q)]),
        lambda q, ids: rrf([bm25_judged(q, ids), dense_judged(q, ids)]))
    # Fusion reuses the two systems' answers: its latency is theirs added up.
    results["rrf_bm25_zero_shot"]["latency_ms"] = results["bm25"]["latency_ms"] + results["zero_shot"]["latency_ms"]
    results["meta"] = {"judgments": str(judgments), "queries": len(data.queries),
                       "unknown_ids_skipped": data.unknown_ids, "items": len(items)}
    return results


def format_table(results: dict) -> str:
    rows = [f"{'system':<22}{'nDCG@10':>9}{'R@100':>8}{'judged nDCG@10':>16}{'ms/query':>10}"]
    for name in ("bm25", "zero_shot", "rrf_bm25_zero_shot", "bundle"):
        if name in results:
            r = results[name]
            rows.append(f"{name:<22}{r['ndcg@10']:>9.4f}{r['recall@100']:>8.4f}{r['judged_ndcg@10']:>16.4f}"
                        f"{r['latency_ms']:>10.2f}")
    return "\n".join(rows)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("bm25", "zero_shot", "rrf_bm25_zero_shot", "bundle") if n in results]
    metrics = ["ndcg@10", "recall@100", "judged_ndcg@10"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [results[name][m] for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + i * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"search quality on {results['meta']['queries']} queries ({Path(results['meta']['judgments']).name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
