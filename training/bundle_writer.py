"""Write a complete artifact bundle from a clean catalog, atomically.

Steps: copy the encoder, encode item passages, build the FAISS index, build the lexical (BM25)
index with the shared tokenizer, write default reranker weights and popularity, then a manifest
with the sha256 of every file. Everything is written into a temporary sibling directory that is
renamed into place only when complete, so a failed run never leaves a half bundle behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import bm25s
import faiss
import numpy as np
import pandas as pd
from bm25s.tokenization import Tokenized
from tqdm.auto import tqdm

from common import bundle_format as bf
from common.cpu import cpu_kind
from common.encoding import TextEncoder
from common.suggest import CATALOG_WEIGHT, SUGGEST_FILE, build_table, load_blocklist
from common.text import tokenize
from kernels import FEATURE_NAMES, SIMILAR_FEATURE_NAMES
from training import distributed as D

log = logging.getLogger(__name__)

# Hand-set until the training pipeline learns them: dense similarity leads, lexical evidence and
# term coverage correct it, brand/category mentions in the query break ties.
DEFAULT_WEIGHTS = {
    "dense": 1.0,
    "lexical": 0.35,
    "bm25": 0.0,
    "coverage": 0.35,
    "number_match": 0.0,
    "category_match": 0.15,
    "brand_match": 0.2,
    "log_price": 0.0,
    "popularity": 0.05,
    "query_terms": 0.0,
    "title_terms": 0.0,
    "dense_rank": 0.0,
    "lexical_rank": 0.0,
}
DEFAULT_SIMILAR_WEIGHTS = {"dense": 1.0, "same_category": 0.1, "same_brand": 0.05, "popularity": 0.05}
FLAT_MAX_ITEMS = 100_000  # exact search below this; IVF-PQ with exact re-scoring above
# Recall measured on the tuning queries overstates recall on unseen ones: at 1M Home Depot vectors a
# pick at 0.983 on 512 rerank-split queries gave 0.977 on 1,024 test-split queries (bench/ann_recall.py).
ANN_MARGIN = 0.005


def similar_spec() -> dict[str, Any]:
    return {"features": list(SIMILAR_FEATURE_NAMES),
            "weights": [DEFAULT_SIMILAR_WEIGHTS[f] for f in SIMILAR_FEATURE_NAMES], "bias": 0.0}


def default_reranker() -> dict[str, Any]:
    """Hand-set linear weights, for bundles built without judgments."""
    return {"type": "linear", "features": list(FEATURE_NAMES), "weights": [DEFAULT_WEIGHTS[f] for f in FEATURE_NAMES],
            "bias": 0.0, "similar": similar_spec()}


@dataclass
class BuildOptions:
    """What a build needs besides the catalog."""

    encoder_dir: Path
    encoder_name: str = "all-MiniLM-L6-v2"
    name: str = "bundle"
    device: str = "cpu"
    dtype: str = "float32"
    max_length: int = 128
    batch_size: int = 64
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    popularity: np.ndarray | None = None
    flat_max_items: int = FLAT_MAX_ITEMS
    # Real queries (text) to tune the ANN index on, for catalogs above flat_max_items; None: perturbed
    # item vectors stand in.
    tuning_queries: list[str] | None = None
    data_fingerprints: dict[str, str] = field(default_factory=dict)
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    # Called with (bundle dir, item vectors) after encoding; writes the recommender's files and
    # returns its manifest section (training.recbuild.build_recommender behind a closure).
    recommender: Callable[[Path, np.ndarray], dict[str, Any]] | None = None
    # Query -> how often it was searched: the suggestion table's log part (common.suggest). Catalog phrases
    # are always mined, so a bundle without a log still suggests.
    query_log: dict[str, float] | None = None


def passage_text(row: pd.Series) -> str:
    """The text an item is encoded from: title first, then brand, category and description."""
    parts = [row["title"], row["brand"], row["category"], row["description"]]
    return ". ".join(p for p in parts if p)


def lexical_text(row: pd.Series) -> str:
    return " ".join(p for p in (row["title"], row["brand"], row["category"], row["description"]) if p)


def code_version() -> str:
    """The git commit of this checkout, or 'unknown' outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(indptr[-1]))
    return indptr, flat


def build_lexical(items: pd.DataFrame, k1: float, b: float) -> tuple[dict[str, np.ndarray], list[str]]:
    """BM25 term->document score matrix (CSC) and the title token lists, over one shared vocabulary."""
    vocab: dict[str, int] = {}
    doc_ids: list[list[int]] = []
    for text in tqdm(items.apply(lexical_text, axis=1), desc="tokenize", unit="item", leave=False):
        doc_ids.append([vocab.setdefault(t, len(vocab)) for t in tokenize(text)])
    title_ids = [
        sorted({vocab[t] for t in tokenize(title) if t in vocab}) for title in items["title"]
    ]
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(Tokenized(ids=doc_ids, vocab=vocab), create_empty_token=False, show_progress=False)
    scores = retriever.scores
    if len(scores["indptr"]) - 1 != len(vocab):
        raise RuntimeError("bm25s vocabulary size does not match the tokenizer's")
    title_indptr, title_tokens = _csr(title_ids)
    arrays = {
        "avgdl": np.float64(np.mean([len(d) for d in doc_ids]) if doc_ids else 1.0),
        "bm25_indptr": np.asarray(scores["indptr"], dtype=np.int64),
        "bm25_indices": np.asarray(scores["indices"], dtype=np.int32),
        "bm25_data": np.asarray(scores["data"], dtype=np.float32),
        "title_indptr": title_indptr,
        "title_tokens": title_tokens,
    }
    words = [""] * len(vocab)
    for word, i in vocab.items():
        words[i] = word
    return arrays, words


def overlap_recall(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each row of truth (exact top-k ids) that the same row of found holds."""
    return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found)]))


def ann_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 100) -> float:
    """Mean recall@k of index against exact inner-product search."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    return overlap_recall(exact.search(queries, k)[1], index.search(queries, k)[1])


def _ivf_lists(n: int) -> int:
    """IVF list count: about 4 sqrt(n), a power of two (4096 at 1M items), so each list holds ~250 items."""
    return int(2 ** round(np.log2(4 * np.sqrt(n))))


def _tuning_queries(vectors: np.ndarray, queries: np.ndarray | None, seed: int) -> tuple[np.ndarray, str]:
    if queries is not None and len(queries):
        q = np.ascontiguousarray(queries[:512], dtype=np.float32)
        return q, f"{len(q)} real query vectors"
    n, d = vectors.shape
    rng = np.random.default_rng(seed)
    q = vectors[rng.choice(n, size=min(300, n), replace=False)] + rng.normal(0, 0.05, (min(300, n), d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, f"{len(q)} perturbed item vectors (no real queries given)"


def build_index(vectors: np.ndarray, flat_max_items: int = FLAT_MAX_ITEMS, target_recall: float = 0.98,
                seed: int = 0, queries: np.ndarray | None = None,
                margin: float = ANN_MARGIN) -> tuple[faiss.Index, dict[str, Any]]:
    """Exact inner-product search up to flat_max_items; above, an IVF index over 4-bit fast-scan PQ
    codes (2 dimensions per code) whose best candidates are re-scored exactly (`IndexRefineFlat`).

    nprobe and the re-scoring depth (k_factor) are chosen here: every pair of a small grid is timed
    and its recall@100 against exact search measured on `queries` (real query vectors the encoder did
    not train on; perturbed item vectors stand in when none are given, which flatters recall: real
    queries sit further from the items), and the fastest pair that reaches target_recall + margin wins
    (the margin covers the gap between the tuning queries and unseen ones). The table goes into the
    manifest.
    Measured at 1M vectors on this project's 2-core CPU (bench/ann_recall.py), this beat HNSW (M 32-64)
    and IVF-Flat at every recall above 0.95."""
    n, d = vectors.shape
    if n <= flat_max_items:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, {"type": "flat_ip", "recall@100_vs_exact": 1.0}
    if d % 2:
        raise ValueError(f"item vectors have {d} dimensions; the PQ index needs an even number")
    nlist = _ivf_lists(n)
    rng = np.random.default_rng(seed)
    train = vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
    index = faiss.index_factory(d, f"IVF{nlist},PQ{d // 2}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index = _add_sharded(index, np.ascontiguousarray(vectors, dtype=np.float32))
    q, measured_on = _tuning_queries(vectors, queries, seed)
    exact = faiss.IndexFlatIP(d)
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    truth = exact.search(q, 100)[1]
    refine = faiss.downcast_index(index)
    ivf = faiss.extract_index_ivf(index)
    tried: list[dict[str, Any]] = []
    for nprobe in (64, 128, 192, 256, 320, 384, 512):
        if nprobe > nlist:
            break
        for k_factor in (4, 8, 12, 16):
            ivf.nprobe, refine.k_factor = nprobe, k_factor
            t0 = time.perf_counter()
            found = index.search(q, 100)[1]
            seconds = time.perf_counter() - t0
            recall = overlap_recall(truth, found)
            tried.append({"nprobe": nprobe, "k_factor": k_factor, "recall": round(recall, 4),
                          "ms_per_query": round(1000 * seconds / len(q), 3)})
    good = [t for t in tried if t["recall"] >= target_recall + margin]
    pick = min(good, key=lambda t: t["ms_per_query"]) if good else max(tried, key=lambda t: t["recall"])
    ivf.nprobe, refine.k_factor = pick["nprobe"], pick["k_factor"]
    return index, {"type": "ivf_pq_refine", "nlist": nlist, "pq": f"{d // 2}x4fs", "nprobe": pick["nprobe"],
                   "k_factor": pick["k_factor"], "recall@100_vs_exact": pick["recall"],
                   "target_recall": target_recall, "margin": margin, "tried": tried,
                   "recall_measured_on": measured_on}


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling of out_dir (which must not exist) to write a bundle into: renamed to out_dir when the block
    completes (atomic on one filesystem: the bundle appears complete or not at all), removed when it fails."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: output directory already exists; choose a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shard_codes(trained_base: np.ndarray, vectors: np.ndarray, part: range) -> np.ndarray:
    """The trained IVF-PQ index (serialized) with the rows `part` of vectors added (their ids 0..len(part)-1),
    serialized: one rank's share of the index."""
    base = faiss.deserialize_index(trained_base)
    base.add(np.ascontiguousarray(vectors[part.start:part.stop], dtype=np.float32))
    return faiss.serialize_index(base)


def merge_shards(shards: list[np.ndarray], starts: list[int]) -> faiss.Index:
    """One IVF-PQ index from the shares (in catalog order; share k's ids shifted by starts[k]): the same lists
    and codes as adding every vector to one index."""
    base = faiss.deserialize_index(shards[0])
    for shard, start in zip(shards[1:], starts[1:]):
        base.merge_from(faiss.deserialize_index(shard), start)
    return base


def _add_sharded(index: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    """Add the catalog to a trained IVF-PQ + exact re-scoring index (rank 0). Data-parallel, the ranks compute
    the coarse assignment and PQ codes of their shares (the part that grows with the catalog; index_share on the
    other ranks) and rank 0 merges them; the re-scoring table is the merged vectors themselves."""
    d = D.current()
    if not d.enabled:
        index.add(vectors)
        return index
    trained = faiss.serialize_index(faiss.downcast_index(index).base_index)
    D.agree(trained, patient=True)  # the other ranks wait here while rank 0 trains the quantizers
    shards = D.gather_objects(shard_codes(trained, vectors, D.shard_range(len(vectors))))
    starts = [len(vectors) * k // d.world for k in range(d.world)]
    return faiss.IndexRefineFlat(merge_shards(shards, starts), faiss.swig_ptr(vectors))


def index_share(vectors: np.ndarray, flat_max_items: int = FLAT_MAX_ITEMS) -> None:
    """A data-parallel rank other than 0: its share of build_index's additions (nothing for a flat index)."""
    if not D.current().enabled or len(vectors) <= flat_max_items:
        return
    trained = D.agree(None, patient=True)
    D.gather_objects(shard_codes(trained, vectors, D.shard_range(len(vectors))))


def follow_bundle(encoder: TextEncoder, items: pd.DataFrame, opts: BuildOptions) -> np.ndarray:
    """A data-parallel rank other than 0: its part of write_bundle (a share of the catalog encoding and of the ANN
    index); returns the whole catalog's vectors."""
    vectors = encode_catalog(encoder, items.reset_index(drop=True), opts.batch_size)
    index_share(vectors, opts.flat_max_items)
    return vectors


def encode_catalog(encoder: TextEncoder, items: pd.DataFrame, batch_size: int) -> np.ndarray:
    """Every item's passage vector. In a data-parallel build each rank encodes its contiguous share of the
    catalog and the shares are gathered in order, so every rank ends with the whole matrix."""
    passages = items.apply(passage_text, axis=1).tolist()
    part = D.shard_range(len(passages))
    mine = passages[part.start:part.stop]
    with tqdm(total=len(mine), desc="encode", unit="item", disable=not D.current().main) as bar:
        vectors = encoder.encode(mine, batch_size=batch_size, progress=bar.update) if mine else None
    if vectors is None:
        vectors = np.zeros((0, encoder.dims), np.float32)
    return D.gather_rows(np.asarray(vectors, np.float32))


def write_bundle(items: pd.DataFrame, out_dir: str | Path, opts: BuildOptions) -> dict[str, Any]:
    """Build a bundle for items into out_dir (which must not exist); returns the manifest."""
    with staged(Path(out_dir)) as tmp:
        tmp.mkdir()
        return _write_into(items.reset_index(drop=True), tmp, opts)


def _write_into(items: pd.DataFrame, root: Path, opts: BuildOptions) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shutil.copytree(opts.encoder_dir, root / bf.ENCODER_DIR, ignore=shutil.ignore_patterns("README.md"))
    items.to_parquet(root / bf.ITEMS_FILE, index=False)
    timings["copy_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoder = TextEncoder(
        root / bf.ENCODER_DIR, device=opts.device, dtype=opts.dtype, max_length=opts.max_length
    )
    vectors = encode_catalog(encoder, items, opts.batch_size)
    np.save(root / bf.VECTORS_FILE, vectors.astype(np.float16))
    timings["encode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuning = None
    if opts.tuning_queries and len(vectors) > opts.flat_max_items:
        tuning = encoder.encode(list(opts.tuning_queries)[:512], batch_size=opts.batch_size)
    index, index_params = build_index(vectors, opts.flat_max_items, queries=tuning)
    faiss.write_index(index, str(root / bf.INDEX_FILE))
    timings["index_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    arrays, words = build_lexical(items, opts.bm25_k1, opts.bm25_b)
    avgdl = float(arrays.pop("avgdl"))
    np.savez(root / bf.LEXICAL_FILE, **arrays)
    (root / bf.VOCAB_FILE).write_text(json.dumps(words), encoding="utf-8")
    timings["lexical_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    suggest = _write_suggest(root, items, words, arrays["bm25_indptr"], arrays["bm25_indices"], opts.query_log)
    timings["suggest_s"] = time.perf_counter() - t0

    popularity = opts.popularity if opts.popularity is not None else np.zeros(len(items), np.float32)
    np.save(root / bf.POPULARITY_FILE, popularity.astype(np.float32))
    (root / bf.RERANKER_FILE).write_text(json.dumps(default_reranker(), indent=2), encoding="utf-8")

    manifest: dict[str, Any] = {
        "schema_version": bf.SCHEMA_VERSION,
        "name": opts.name,
        "bundle_version": "",
        "code_version": code_version(),
        "data_fingerprints": opts.data_fingerprints,
        "encoder": {
            "path": bf.ENCODER_DIR,
            "name": opts.encoder_name,
            "dims": encoder.dims,
            "max_length": opts.max_length,
            "pooling": "mean",
            "normalize": True,
            "passage": "title. brand. category. description",
            # The item vectors' precision and the CPU that computed them: bf16 and fp32 vectors agree to
            # cosine >= 0.9998, but figures from the two CPU kinds are not comparable (docs/cpu.md).
            "catalog_encoding": {"device": opts.device, "dtype": opts.dtype, **cpu_kind()},
        },
        "items": {"file": bf.ITEMS_FILE, "vectors": bf.VECTORS_FILE, "count": len(items),
                  "vector_dtype": "float16"},
        "index": {"file": bf.INDEX_FILE, "metric": "inner_product", "ntotal": int(index.ntotal),
                  **index_params},
        "lexical": {"file": bf.LEXICAL_FILE, "vocab": bf.VOCAB_FILE, "method": "lucene",
                    "k1": opts.bm25_k1, "b": opts.bm25_b, "avgdl": avgdl, "vocab_size": len(words),
                    "tokenizer": "common.text.tokenize", "spelling": "titles"},
        "reranker": {"file": bf.RERANKER_FILE, "type": "linear", "features": list(FEATURE_NAMES)},
        "popularity": {"file": bf.POPULARITY_FILE},
        "suggest": suggest,
        "metrics": {},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        **opts.extra_manifest,
    }
    if opts.recommender is not None:
        t0 = time.perf_counter()
        manifest["recommender"] = opts.recommender(root, vectors)
        manifest["timings"]["recommender_s"] = round(time.perf_counter() - t0, 3)
    return seal(root, manifest)


def _write_suggest(root: Path, items: pd.DataFrame, words: list[str], indptr: np.ndarray, indices: np.ndarray,
                   query_log: dict[str, float] | None) -> dict[str, Any]:
    """Write the suggestion table (common.suggest) into a bundle folder; returns its manifest section."""
    (root / "suggest").mkdir(exist_ok=True)
    table = build_table(query_log or {}, items, {w: i for i, w in enumerate(words)}, indptr, indices,
                        load_blocklist())
    table.to_parquet(root / SUGGEST_FILE, index=False)
    return {"file": SUGGEST_FILE, "phrases": len(table), "log_phrases": int((table["log_count"] > 0).sum()),
            "catalog_phrases": int((table["catalog_count"] > 0).sum()), "blocked": int(table["blocked"].sum()),
            "catalog_weight": CATALOG_WEIGHT}


def rebuild_suggest(bundle: str | Path, out_dir: str | Path, query_log: dict[str, float] | None) -> dict[str, Any]:
    """A copy of bundle with its suggestion table built from query_log and the bundle's own catalog and lexical
    index (a new version; the encoder, vectors and indexes are copied as they are)."""
    bundle = Path(bundle)
    manifest = bf.read_manifest(bundle)
    with staged(Path(out_dir)) as tmp:
        shutil.copytree(bundle, tmp)
        items = pd.read_parquet(tmp / manifest["items"]["file"])
        lex = np.load(tmp / manifest["lexical"]["file"], allow_pickle=False)
        words = json.loads((tmp / manifest["lexical"]["vocab"]).read_text(encoding="utf-8"))
        t0 = time.perf_counter()
        manifest["suggest"] = _write_suggest(tmp, items, words, lex["bm25_indptr"], lex["bm25_indices"], query_log)
        manifest.setdefault("timings", {})["suggest_s"] = round(time.perf_counter() - t0, 3)
        manifest["suggest"]["rebuilt_from"] = manifest["bundle_version"]
        return seal(tmp, manifest)  # seal rewrites manifest.json last, with every file's new checksum


def seal(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file, stamp the version (name-time-digest) and write manifest.json last."""
    manifest["files"] = bf.checksum_tree(root)
    created = datetime.now(timezone.utc)
    digest = bf.sha256_text(json.dumps(manifest["files"], sort_keys=True))[:8]
    manifest["created_at"] = created.isoformat()
    manifest["bundle_version"] = f"{manifest.get('name', 'bundle')}-{created:%Y%m%dT%H%M%SZ}-{digest}"
    (root / bf.MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest
