"""Candidate retrieval: FAISS dense search (once per batch) and BM25 lexical search, with filters.

Filters are applied inside retrieval so that k results come back whenever k matching items exist:
unfiltered queries share one batched FAISS search; a filtered query searches with an ID selector,
or exactly over its subset when the subset is small (or when the ANN search came back short).
"""
from __future__ import annotations

import logging
import threading

import faiss
import numpy as np

from common.text import SEP, WORD, normalise_path, normalize
from kernels import features as K
from server.bundle import Bundle, ItemTable
from server.types import Filters

log = logging.getLogger(__name__)


def category_ids(items: ItemTable, values) -> list[int]:
    """The categories a category filter admits: each value (case-insensitive, any spacing around '>') and every
    category below it in the path ("Toys > Vehicles" admits "Toys > Vehicles > Trains", not "Toys > Vehicles2"),
    so that selecting a level of a category path filters to everything under it."""
    wanted = [normalise_path(v).lower() for v in values]
    return [cid for cid, path in enumerate(items.category_paths)
            if any(path == w or path.startswith(w + SEP) for w in wanted)]


def filter_mask(items: ItemTable, filters: Filters) -> np.ndarray | None:
    """Boolean mask of the items a filter admits, or None when nothing is filtered.

    Unknown category or brand names (and unknown item ids) match nothing (an empty result, not an error). Items with an
    unknown price never pass a price bound.
    """
    if not filters.active:
        return None
    mask = np.ones(len(items), dtype=bool)
    if filters.min_price is not None:
        mask &= items.price_exact >= filters.min_price  # exact prices; NaN compares False: unknown prices drop out
    if filters.max_price is not None:
        mask &= items.price_exact <= filters.max_price
    if filters.below_price is not None:
        mask &= items.price_exact < filters.below_price
    if filters.in_stock_only:
        mask &= items.in_stock
    if filters.categories:
        mask &= np.isin(items.category_id, np.asarray(category_ids(items, filters.categories), dtype=np.int32))
    if filters.brands:
        ids = [items.brand_index[b.strip().lower()] for b in filters.brands if b.strip().lower() in items.brand_index]
        mask &= np.isin(items.brand_id, np.asarray(ids, dtype=np.int32))
    if filters.item_ids:
        rows = [items.id_to_row[i] for i in filters.item_ids if i in items.id_to_row]
        allowed = np.zeros(len(items), dtype=bool)
        allowed[rows] = True
        mask &= allowed
    return mask


def _exact_top(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
    """Best n of rows by inner product with q, best first, ties by row."""
    if len(rows) == 0:
        return rows.astype(np.int64)
    scores = vectors[rows].astype(np.float32) @ np.asarray(q, np.float32)
    if n < len(rows):
        keep = np.argpartition(-scores, n - 1)[:n]
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))
    return rows[order].astype(np.int64)


class DenseRetriever:
    """The bundle's FAISS index, on the GPU when asked for and available (one resources object)."""

    def __init__(self, bundle: Bundle, device: str, exact_filter_max: int) -> None:
        self.vectors = bundle.vectors
        self.cpu_index = bundle.index
        self.exact_filter_max = exact_filter_max
        self.index = bundle.index
        self.scan_index = bundle.scan_index
        # Small unfiltered batches of an exact bundle go to its cheaper twin (server.bundle.small_batch_index):
        # a full exact search reads every vector whatever the batch; one BLAS product wins only for big ones.
        self.scan_batch_max = bundle.scan_batch_max
        self.on_gpu = False
        self._gpu_lock = threading.Lock()  # faiss GPU calls are serialised
        spec = bundle.manifest["index"]
        self._ivf = None
        if bundle.index_type.startswith("hnsw"):
            self.cpu_index.hnsw.efSearch = int(spec.get("efSearch", 128))
        elif bundle.index_type == "ivf_pq_refine":
            # The manifest is the record of the pair whose recall the build measured: serve exactly that.
            self._ivf = faiss.extract_index_ivf(self.cpu_index)
            self._ivf.nprobe = int(spec["nprobe"])
            self.cpu_index.k_factor = float(spec["k_factor"])
        gpu_ok = bundle.index_type == "flat_ip"  # faiss-gpu has no HNSW and no fast-scan PQ
        if (device.startswith("cuda") and gpu_ok and hasattr(faiss, "StandardGpuResources")
                and faiss.get_num_gpus() > 0):
            self._gpu_res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.cpu_index)
            self.on_gpu = True
            log.info("FAISS index moved to the GPU")
        # Batched searches must use BLAS (the default threshold skips it for small batches, ~6x slower).
        faiss.cvar.distance_compute_blas_threshold = 1

    def _search(self, index: faiss.Index, queries: np.ndarray, n: int, params=None) -> np.ndarray:
        if index is self.index and self.on_gpu:
            with self._gpu_lock:
                return index.search(queries, n)[1]
        if params is not None:
            return index.search(queries, n, params=params)[1]
        return index.search(queries, n)[1]

    def search(self, queries: np.ndarray, ns: list[int], masks: list[np.ndarray | None]) -> list[np.ndarray]:
        """Top-ns[i] item rows for each query row, honouring masks[i] (None = no filter)."""
        out: list[np.ndarray] = [np.empty(0, np.int64)] * len(ns)
        plain = [i for i, m in enumerate(masks) if m is None]
        if plain:
            n = min(max(ns[i] for i in plain), self.cpu_index.ntotal)
            index = self.index
            if not self.on_gpu and self.scan_index is not None and len(plain) <= self.scan_batch_max:
                index = self.scan_index
            labels = self._search(index, np.ascontiguousarray(queries[plain]), n)
            for j, i in enumerate(plain):
                row = labels[j]
                out[i] = row[row >= 0][: ns[i]].astype(np.int64)
        for i, mask in enumerate(masks):
            if mask is not None:
                out[i] = self.search_filtered(queries[i], ns[i], mask)
        return out

    def search_filtered(self, q: np.ndarray, n: int, mask: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(mask)
        want = min(n, len(rows))
        if want == 0:
            return np.empty(0, np.int64)
        if len(rows) <= self.exact_filter_max:
            return _exact_top(self.vectors, rows, q, want)
        bits = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        params = faiss.SearchParameters(sel=selector)
        if self.cpu_index.__class__.__name__.startswith("IndexHNSW"):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.cpu_index.hnsw.efSearch, want))
        elif self._ivf is not None:
            ivf_params = faiss.SearchParametersIVF(sel=selector, nprobe=self._ivf.nprobe)  # kept alive by this name
            params = faiss.IndexRefineSearchParameters(k_factor=self.cpu_index.k_factor, base_index_params=ivf_params)
        labels = self._search(self.cpu_index, np.ascontiguousarray(q[None, :], dtype=np.float32), want, params)[0]
        labels = labels[labels >= 0]
        if len(labels) < want:  # an ANN index can come back short under a filter: answer exactly
            return _exact_top(self.vectors, rows, q, want)
        return labels.astype(np.int64)


class LexicalRetriever:
    """BM25 over the bundle's lexical index, scored by the kernels."""

    def __init__(self, bundle: Bundle) -> None:
        self.lex = bundle.lexical
        self.n_docs = len(bundle.items)

    def score(self, token_lists: list[np.ndarray]) -> np.ndarray:
        """BM25 score of every item for every query: float32[Q, n_items]."""
        indptr = np.zeros(len(token_lists) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(t) for t in token_lists])
        tokens = np.concatenate(token_lists) if token_lists else np.empty(0, np.int32)
        return K.bm25_accumulate(indptr, tokens.astype(np.int32), self.lex.bm25_indptr,
                                 self.lex.bm25_indices, self.lex.bm25_data, self.n_docs)

    @staticmethod
    def top(scores_row: np.ndarray, n: int, mask: np.ndarray | None) -> np.ndarray:
        """Rows of the n best positive BM25 scores among the mask's items."""
        return K.topn_masked(scores_row, mask if mask is not None else np.empty(0, dtype=np.bool_), n)


MAX_EXPANSIONS = 8  # words an unfinished last word stands for (the catalog's most frequent that start with it)


def split_partial(text: str) -> tuple[str, str]:
    """(the finished words, the unfinished last word) of text typed so far; no unfinished word when the text
    ends with a space or punctuation."""
    norm = normalize(text)
    if not norm or not (norm[-1].isalnum()):
        return text, ""
    last = None
    for last in WORD.finditer(norm):
        pass
    if last is None or last.end() != len(norm):
        return text, ""
    return norm[: last.start()], last.group()


class PrefixIndex:
    """The lexical vocabulary sorted, for prefix expansion (search as you type)."""

    def __init__(self, lex) -> None:
        terms = sorted(lex.vocab)
        self.terms = terms
        self.ids = np.array([lex.vocab[t] for t in terms], dtype=np.int32)
        df = np.diff(lex.bm25_indptr)
        self.df = df[self.ids] if len(self.ids) else np.zeros(0, np.int64)

    def expand(self, partial: str) -> np.ndarray:
        """Ids of the most frequent vocabulary terms that start with partial, most frequent first."""
        import bisect

        lo = bisect.bisect_left(self.terms, partial)
        hi = bisect.bisect_left(self.terms, partial + "\U0010ffff")
        if hi <= lo:
            return np.empty(0, np.int32)
        df = self.df[lo:hi]
        n = min(MAX_EXPANSIONS, hi - lo)
        top = np.argsort(-df, kind="stable")[:n]
        return self.ids[lo:hi][top]
