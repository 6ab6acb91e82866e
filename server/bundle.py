"""Load and verify an artifact bundle: manifest, schema version, checksums, shapes.

`load_bundle` either returns a complete, consistent `Bundle` or raises `BundleError` with a message
that says what is wrong and where; the server refuses to serve anything less. Files are read with
safe loaders only (npy/npz without pickle, parquet, json, FAISS's own format, safetensors).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from common import bundle_format as bf
from common.spelling import Speller
from common.text import normalise_path, number_tokens, term_ids, tokenize
from kernels import FEATURE_NAMES, SIMILAR_FEATURE_NAMES
from kernels.recfeatures import REC_FEATURE_NAMES

log = logging.getLogger(__name__)


class BundleError(Exception):
    """The bundle cannot be served; the message says why."""


@dataclass(frozen=True)
class ItemTable:
    """Columnar item store; row i is the item at position i of the vectors and indexes."""

    ids: list[str]
    id_to_row: dict[str, int]
    titles: list[str]
    categories: list[str]
    brands: list[str]
    price: np.ndarray  # float32, NaN = unknown: the kernels' feature input (as the reranker was trained)
    in_stock: np.ndarray  # bool
    category_id: np.ndarray  # int32 into category_names, -1 = none
    brand_id: np.ndarray  # int32 into brand_names, -1 = none
    category_index: dict[str, int]  # lower-cased name -> id
    category_paths: list[str]  # by id: the name as a lower-cased path in its one spelling ("a > b"), for filters
    brand_index: dict[str, int]
    cat_indptr: np.ndarray  # token ids of each category name (CSR, sorted)
    cat_tokens: np.ndarray
    brand_indptr: np.ndarray
    brand_tokens: np.ndarray
    category_predicted: np.ndarray  # bool: the category was filled in by the classifier (live upserts)
    # float64, NaN = unknown: the price exactly as given (a double in the catalog, the log and the proto), for
    # answers, price filters and anything a shopper sees; float32 would turn 322.99 into 322.989990234375.
    price_exact: np.ndarray
    category_names_by_id: list[str]  # by id: the name as first spelled (facet values)
    brand_names_by_id: list[str]
    # float64 ms since the epoch the item entered the catalog (live upserts; a catalog's `added_ms` column),
    # 0 = with the bundle: the "newest" sort order.
    added_ms: np.ndarray
    attributes: list[dict[str, str]]  # by row: the item's attributes (merchandising boosts by attribute)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class LexicalIndex:
    """BM25 term->document scores (CSC) and the title tokens of each item (CSR), one vocabulary."""

    vocab: dict[str, int]
    bm25_indptr: np.ndarray
    bm25_indices: np.ndarray
    bm25_data: np.ndarray
    title_indptr: np.ndarray
    title_tokens: np.ndarray
    token_is_number: np.ndarray  # bool per vocabulary id
    speller: Speller | None = None  # query spelling correction, when the bundle was trained with it

    def token_ids(self, text: str) -> np.ndarray:
        """Distinct token ids of text, sorted; -1 stands for any word outside the vocabulary."""
        return term_ids(text, self.vocab)


@dataclass(frozen=True)
class Reranker:
    """The bundle's Search scorer (linear weights or LambdaMART trees, in the kernels' feature order)
    and the linear weights of SimilarItems."""

    kind: str  # linear | lambdamart
    features: tuple[str, ...]
    weights: np.ndarray  # linear only
    bias: float
    trees: dict[str, np.ndarray] | None  # lambdamart only: the node arrays of kernels.trees
    similar_features: tuple[str, ...]
    similar_weights: np.ndarray
    similar_bias: float


@dataclass(frozen=True)
class RecParts:
    """The recommender: sequence-encoder weights, item vectors (row-aligned with the item table),
    users' histories, popularity and co-occurrence statistics and the re-scoring weights."""

    spec: dict[str, Any]
    state: dict[str, Any]  # safetensors tensors of the SeqEncoder (+ text_proj.weight)
    vectors: np.ndarray  # float32 [n, d]
    user_index: dict[str, int]
    hist_indptr: np.ndarray
    hist_items: np.ndarray
    popularity: np.ndarray  # float32 [n], time-decayed counts
    co_indptr: np.ndarray
    co_indices: np.ndarray
    co_weights: np.ndarray
    weights: np.ndarray  # float32 [len(REC_FEATURE_NAMES)]

    def history(self, user: int) -> np.ndarray:
        return self.hist_items[self.hist_indptr[user]:self.hist_indptr[user + 1]]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    version: str
    items: ItemTable
    vectors: np.ndarray  # float16 [n, dims], L2-normalised; upcast the rows you read
    index: faiss.Index
    index_type: str
    lexical: LexicalIndex
    reranker: Reranker
    popularity: np.ndarray  # float32 [n] in [0, 1]
    encoder_dir: Path
    encoder: dict[str, Any]
    rec: RecParts | None = None  # the recommender, when the bundle was built with behaviour data
    alive: np.ndarray | None = None  # bool per row; None = every row is alive (no live deletions)
    scan_index: faiss.Index | None = None  # small-batch search over an exact index (see small_batch_index)
    scan_batch_max: int = 0  # unfiltered batches of up to this many queries use scan_index
    suggest: pd.DataFrame | None = None  # the suggestion table (common.suggest); None in bundles built before it


# Exact (flat) bundles answer small batches through a cheaper index that returns the same top-k.
# From this many items: 4-bit fast-scan PQ (2 dimensions a code) whose best K_FACTOR x k candidates
# are re-scored exactly against the flat index. On the Home Depot bundle (53k items, 1,444 real test
# queries) K_FACTOR 16 gave the exact top-100 (at most one item of 144,400 differed, near rank 100) at
# 1.7-1.9 ms a query against 11-13 ms for the flat BLAS search, and stayed faster up to batch 64.
# The codes are trained at load with 4 k-means iterations (0.7 s; faiss's default 25 took 3 s and
# found the same top-100, since the exact re-scoring decides the order). Below it: an fp16 copy,
# scanned for up to 4 queries.
FAST_SCAN_MIN_ITEMS = 10_000
FAST_SCAN_K_FACTOR = 16
FAST_SCAN_BATCH_MAX = 32
FAST_SCAN_TRAIN_ITERATIONS = 4
FP16_SCAN_BATCH_MAX = 4


def small_batch_index(index: faiss.Index, vectors: np.ndarray) -> tuple[faiss.Index | None, int]:
    """(index for small unfiltered batches, the largest batch to use it for) over an exact IP index."""
    if not (isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT):
        return None, 0
    n, dims = vectors.shape
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if n >= FAST_SCAN_MIN_ITEMS and dims % 2 == 0:
        codes = faiss.index_factory(dims, f"PQ{dims // 2}x4fs", faiss.METRIC_INNER_PRODUCT)
        codes.pq.cp.niter = FAST_SCAN_TRAIN_ITERATIONS
        codes.train(x)  # k-means with faiss's fixed seed: the same codes on every load
        codes.add(x)
        refine = faiss.IndexRefine(codes, index)  # re-scores against the bundle's flat index, no copy (faiss keeps both alive)
        refine.k_factor = float(FAST_SCAN_K_FACTOR)
        return refine, FAST_SCAN_BATCH_MAX
    return fp16_scan_index(x), FP16_SCAN_BATCH_MAX


def fp16_scan_index(vectors: np.ndarray) -> faiss.Index:
    """An fp16 copy of item vectors, scanned query by query (half the bytes of the fp32 index)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    scan = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    scan.add(x)  # fp16 values: encoded exactly
    return scan


def add_to_small_batch_index(scan: faiss.Index, vectors: np.ndarray) -> None:
    """Append live items; the flat index (a fast-scan index's re-scoring half) is added to by the caller."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if isinstance(scan, faiss.IndexRefine):
        scan.base_index.add(x)
        scan.ntotal = scan.base_index.ntotal
    else:
        scan.add(x)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BundleError(message)


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check that every file the manifest lists exists with the recorded sha256."""
    files = manifest.get("files")
    _require(isinstance(files, dict) and files, f"{root}: manifest lists no files")
    for rel, expected in files.items():
        path = root / rel
        _require(path.is_file(), f"{root}: file {rel} is missing")
        actual = bf.sha256_file(path)
        _require(actual == expected, f"{root}: checksum mismatch for {rel} (expected {expected[:12]}…, got {actual[:12]}…)")


def _token_csr(names: list[str], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    lists = [sorted({vocab[t] for t in tokenize(n) if t in vocab}) for n in names]
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    return indptr, np.array([t for x in lists for t in x], dtype=np.int32)


def _encode_names(values: list[str]) -> tuple[np.ndarray, dict[str, int], list[str]]:
    index: dict[str, int] = {}
    names: list[str] = []
    ids = np.full(len(values), -1, dtype=np.int32)
    for i, value in enumerate(values):
        if not value:
            continue
        key = value.strip().lower()
        if key not in index:
            index[key] = len(names)
            names.append(value)
        ids[i] = index[key]
    return ids, index, names


def _load_items(root: Path, manifest: dict[str, Any], vocab: dict[str, int]) -> ItemTable:
    df = pd.read_parquet(root / manifest["items"]["file"])
    missing = {"item_id", "title", "category", "brand", "price", "in_stock"} - set(df.columns)
    _require(not missing, f"{root}: items table lacks columns {sorted(missing)}")
    ids = df["item_id"].astype(str).tolist()
    _require(len(set(ids)) == len(ids), f"{root}: items table has duplicate item_id values")
    return build_item_table(df, vocab)


def build_item_table(df: pd.DataFrame, vocab: dict[str, int]) -> ItemTable:
    """Columnar item table from a frame with item_id, title, category, brand, price, in_stock.
    With repeated ids (live changes), id_to_row points at an id's last row."""
    ids = df["item_id"].astype(str).tolist()
    categories = df["category"].fillna("").astype(str).tolist()
    brands = df["brand"].fillna("").astype(str).tolist()
    category_id, category_index, category_names = _encode_names(categories)
    brand_id, brand_index, brand_names = _encode_names(brands)
    cat_indptr, cat_tokens = _token_csr(category_names, vocab)
    brand_indptr, brand_tokens = _token_csr(brand_names, vocab)
    return ItemTable(
        ids=ids,
        id_to_row={item_id: i for i, item_id in enumerate(ids)},
        titles=df["title"].astype(str).tolist(),
        categories=categories,
        brands=brands,
        price=df["price"].astype("float64").to_numpy(dtype=np.float32, na_value=np.nan),
        in_stock=df["in_stock"].astype(bool).to_numpy(),
        category_id=category_id,
        brand_id=brand_id,
        category_index=category_index,
        category_paths=[normalise_path(n).lower() for n in category_names],
        brand_index=brand_index,
        cat_indptr=cat_indptr,
        cat_tokens=cat_tokens,
        brand_indptr=brand_indptr,
        brand_tokens=brand_tokens,
        category_predicted=(df["category_predicted"].fillna(False).astype(bool).to_numpy()
                            if "category_predicted" in df.columns else np.zeros(len(ids), bool)),
        price_exact=df["price"].astype("float64").to_numpy(dtype=np.float64, na_value=np.nan),
        category_names_by_id=category_names,
        brand_names_by_id=brand_names,
        attributes=[_attrs(a) for a in df["attributes"]] if "attributes" in df.columns else [{} for _ in ids],
        added_ms=(df["added_ms"].astype("float64").fillna(0.0).to_numpy(dtype=np.float64)
                  if "added_ms" in df.columns else np.zeros(len(ids), np.float64)),
    )


def _attrs(value) -> dict[str, str]:
    """An attributes cell (JSON text in the bundle's parquet, a dict from the live log) as a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


TREE_ARRAYS = ("node_feature", "node_threshold", "node_left", "node_right", "node_value", "tree_roots")


def _load_trees(root: Path, file: str) -> dict[str, np.ndarray]:
    data = np.load(root / file, allow_pickle=False)
    missing = set(TREE_ARRAYS) - set(data.files)
    _require(not missing, f"{root}: reranker trees lack arrays {sorted(missing)}")
    trees = {k: data[k] for k in TREE_ARRAYS}
    n_nodes = len(trees["node_feature"])
    for k in ("node_threshold", "node_left", "node_right", "node_value"):
        _require(len(trees[k]) == n_nodes, f"{root}: reranker tree array {k} has the wrong length")
    internal = trees["node_feature"] >= 0
    _require(bool((trees["node_feature"] < len(FEATURE_NAMES)).all()), f"{root}: a tree splits on an unknown feature")
    for k in ("node_left", "node_right"):
        _require(bool(((trees[k][internal] > 0) & (trees[k][internal] < n_nodes)).all()),
                 f"{root}: reranker trees have out-of-range child links")
    _require(bool(((trees["tree_roots"] >= 0) & (trees["tree_roots"] < n_nodes)).all()),
             f"{root}: reranker tree roots out of range")
    _require(bool(np.isfinite(trees["node_value"]).all()), f"{root}: reranker trees hold NaN values")
    return trees


def _load_reranker(root: Path, manifest: dict[str, Any]) -> Reranker:
    spec = json.loads((root / manifest["reranker"]["file"]).read_text(encoding="utf-8"))
    kind = spec.get("type")
    _require(kind in ("linear", "lambdamart"), f"{root}: reranker type {kind!r} is not supported by this server")
    _require(
        tuple(spec.get("features", ())) == FEATURE_NAMES,
        f"{root}: reranker features {spec.get('features')} differ from this server's schema {list(FEATURE_NAMES)}",
    )
    similar = spec.get("similar", {})
    _require(
        tuple(similar.get("features", ())) == SIMILAR_FEATURE_NAMES,
        f"{root}: similar-items features {similar.get('features')} differ from {list(SIMILAR_FEATURE_NAMES)}",
    )
    sim_weights = np.asarray(similar["weights"], dtype=np.float32)
    _require(sim_weights.shape == (len(SIMILAR_FEATURE_NAMES),) and np.isfinite(sim_weights).all(),
             f"{root}: bad similar-items weights")
    weights, trees = np.zeros(len(FEATURE_NAMES), np.float32), None
    if kind == "linear":
        weights = np.asarray(spec["weights"], dtype=np.float32)
        _require(weights.shape == (len(FEATURE_NAMES),) and np.isfinite(weights).all(), f"{root}: bad reranker weights")
    else:
        trees = _load_trees(root, spec["trees_file"])
    return Reranker(kind, FEATURE_NAMES, weights, float(spec.get("bias", 0.0)), trees,
                    SIMILAR_FEATURE_NAMES, sim_weights, float(similar.get("bias", 0.0)))


def _load_rec(root: Path, spec: dict[str, Any], n: int) -> RecParts:
    from safetensors.torch import load_file  # safe format: tensors only, no code

    _require(tuple(spec.get("features", ())) == REC_FEATURE_NAMES,
             f"{root}: recommender features {spec.get('features')} differ from this server's {list(REC_FEATURE_NAMES)}")
    weights = np.asarray(spec.get("weights", []), dtype=np.float32)
    _require(weights.shape == (len(REC_FEATURE_NAMES),) and np.isfinite(weights).all(), f"{root}: bad recommender weights")
    state = load_file(str(root / spec["model"]))
    vectors = np.load(root / spec["vectors"], allow_pickle=False).astype(np.float32)
    dims = int(spec["dims"])
    _require(vectors.shape == (n, dims), f"{root}: recommender vectors have shape {vectors.shape}, expected ({n}, {dims})")
    _require(np.isfinite(vectors).all(), f"{root}: recommender vectors contain NaN or infinity")
    users = pd.read_parquet(root / spec["users"])["user_id"].astype(str).tolist()
    hist = np.load(root / spec["history"], allow_pickle=False)
    indptr, items = hist["indptr"].astype(np.int64), hist["items"].astype(np.int32)
    _require(len(indptr) == len(users) + 1 and indptr[-1] == len(items), f"{root}: recommender histories are inconsistent")
    _require(len(items) == 0 or (items.min() >= 0 and items.max() < n), f"{root}: a history names an item row out of range")
    st = np.load(root / spec["stats"], allow_pickle=False)
    pop = st["popularity"].astype(np.float32)
    _require(pop.shape == (n,) and len(st["co_indptr"]) == n + 1, f"{root}: recommender statistics do not match the item count")
    return RecParts(spec, state, vectors, {u: i for i, u in enumerate(users)}, indptr, items, pop,
                    st["co_indptr"].astype(np.int64), st["co_indices"].astype(np.int32),
                    st["co_weights"].astype(np.float32), weights)


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle directory; raises BundleError if anything is off."""
    root = Path(path)
    _require(root.is_dir(), f"{root}: bundle directory not found")
    try:
        manifest = bf.read_manifest(root)
    except (FileNotFoundError, ValueError) as exc:
        raise BundleError(str(exc)) from exc
    schema = manifest.get("schema_version")
    _require(isinstance(schema, int), f"{root}: manifest has no integer schema_version")
    _require(schema <= bf.SCHEMA_VERSION,
             f"{root}: bundle schema version {schema} is newer than this server supports ({bf.SCHEMA_VERSION}); upgrade the server")
    _require(schema == bf.SCHEMA_VERSION, f"{root}: bundle schema version {schema} is no longer supported (need {bf.SCHEMA_VERSION})")
    for key in ("bundle_version", "encoder", "items", "index", "lexical", "reranker", "popularity"):
        _require(key in manifest, f"{root}: manifest lacks '{key}'")
    verify_files(root, manifest)
    try:
        lex = np.load(root / manifest["lexical"]["file"], allow_pickle=False)
        words = json.loads((root / manifest["lexical"]["vocab"]).read_text(encoding="utf-8"))
        vocab = {w: i for i, w in enumerate(words)}
        items = _load_items(root, manifest, vocab)
        # The reranker learned on corrected queries; serving them uncorrected would skew its features.
        speller = Speller(items.titles, words) if manifest["lexical"].get("spelling") == "titles" else None
        lexical = LexicalIndex(vocab, lex["bm25_indptr"], lex["bm25_indices"], lex["bm25_data"],
                               lex["title_indptr"], lex["title_tokens"], number_tokens(words), speller)
        # Kept in fp16, as stored: the FAISS index holds its own fp32 copy for search, and these are only
        # read a few hundred rows at a time (re-scoring, filtered search), upcast there.
        vectors = np.load(root / manifest["items"]["vectors"], allow_pickle=False).astype(np.float16, copy=False)
        index = faiss.read_index(str(root / manifest["index"]["file"]))
        popularity = np.load(root / manifest["popularity"]["file"], allow_pickle=False).astype(np.float32)
        reranker = _load_reranker(root, manifest)
        rec = _load_rec(root, manifest["recommender"], len(items)) if manifest.get("recommender") else None
        suggest = _load_suggest(root, manifest["suggest"]) if manifest.get("suggest") else None
    except BundleError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: FAISS read errors
        raise BundleError(f"{root}: cannot read bundle ({type(exc).__name__}: {exc})") from exc
    n, dims = len(items), int(manifest["encoder"]["dims"])
    _require(vectors.shape == (n, dims), f"{root}: item vectors have shape {vectors.shape}, expected ({n}, {dims})")
    _require(index.d == dims, f"{root}: FAISS index has {index.d} dimensions, encoder has {dims}")
    _require(index.ntotal == n, f"{root}: FAISS index holds {index.ntotal} vectors for {n} items")
    _require(popularity.shape == (n,), f"{root}: popularity has shape {popularity.shape}, expected ({n},)")
    _require(len(lexical.title_indptr) == n + 1, f"{root}: lexical index covers {len(lexical.title_indptr) - 1} items, expected {n}")
    _require(len(lexical.bm25_indptr) == len(vocab) + 1, f"{root}: lexical index and vocabulary sizes differ")
    _require(np.isfinite(vectors).all(), f"{root}: item vectors contain NaN or infinity")
    encoder_dir = root / manifest["encoder"]["path"]
    _require((encoder_dir / "config.json").is_file(), f"{root}: encoder folder has no config.json")
    # Built at load (~1 s at 53k items): an overlap with the encoder's load was measured no faster here.
    scan_index, scan_batch_max = small_batch_index(index, vectors)
    return Bundle(
        path=root.resolve(),
        manifest=manifest,
        version=str(manifest["bundle_version"]),
        items=items,
        vectors=vectors,
        index=index,
        index_type=str(manifest["index"].get("type", "unknown")),
        lexical=lexical,
        reranker=reranker,
        popularity=popularity,
        encoder_dir=encoder_dir,
        encoder=dict(manifest["encoder"]),
        scan_index=scan_index,
        scan_batch_max=scan_batch_max,
        rec=rec,
        suggest=suggest,
    )


SUGGEST_COLUMNS = {"text": "string", "log_count": "float", "catalog_count": "float", "results": "integer",
                   "top_category": "string", "blocked": "bool"}


def _load_suggest(root: Path, spec: dict[str, Any]) -> pd.DataFrame:
    df = pd.read_parquet(root / spec["file"])
    missing = set(SUGGEST_COLUMNS) - set(df.columns)
    _require(not missing, f"{root}: suggestion table lacks columns {sorted(missing)}")
    texts = df["text"].astype(str).tolist()
    _require(texts == sorted(texts) and len(set(texts)) == len(texts),
             f"{root}: suggestion table is not sorted by text or repeats a phrase")
    return df
