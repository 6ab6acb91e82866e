"""The search engine over one bundle: encode -> dense + lexical candidates -> rerank -> top k.

`search_batch` is the batcher's batch function: one encoder forward pass, one FAISS search and one
kernel pass for the whole batch. `similar` answers SimilarItems. Nothing here knows about gRPC.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from common.encoding import TextEncoder
from server.bundle import Bundle
from server.config import ServerConfig
from server.errors import NotFound
from server.ranking import Ranker
from server.retrieval import DenseRetriever, LexicalRetriever, filter_mask
from server.types import NO_FILTERS, Filters, Hit, SearchOutcome, SearchQuery

log = logging.getLogger(__name__)
# SimilarItems: how much co-occurrence (bought/viewed together) adds to the vector-similarity score.
# Small on purpose: similar items stay substitutes first, with complements ordered among them.
SIMILAR_CO_WEIGHT = 0.2


class SearchEngine:
    """Search and SimilarItems over one loaded bundle."""

    def __init__(self, bundle: Bundle, encoder: TextEncoder, config: ServerConfig) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.config = config
        self.dense = DenseRetriever(bundle, encoder.device, config.exact_filter_max)
        self.lexical = LexicalRetriever(bundle)
        self.ranker = Ranker(bundle)

    def search_batch(self, queries: list[SearchQuery]) -> list[SearchOutcome]:
        """Answer a batch of validated queries (the batcher's batch function)."""
        t0 = time.perf_counter()
        speller = self.bundle.lexical.speller
        fixed = [speller.correct(q.text) if speller is not None else None for q in queries]
        texts = [f or q.text for f, q in zip(fixed, queries)]
        qvecs = self.encoder.encode(texts, batch_size=max(len(queries), 1))
        t1 = time.perf_counter()
        vectors = self.bundle.vectors
        masks = [self._mask(q.filters) for q in queries]
        ns = [max(self.config.candidates, q.k) for q in queries]
        dense_rows = self.dense.search(qvecs, ns, masks)
        tokens = [self.bundle.lexical.token_ids(t) for t in texts]
        bm25 = self.lexical.score(tokens)
        candidates, dense_scores, lex_scores = [], [], []
        for i in range(len(queries)):
            lex_rows = self.lexical.top(bm25[i], ns[i], masks[i])
            rows = np.union1d(dense_rows[i], lex_rows)
            candidates.append(rows)
            dense_scores.append(vectors[rows].astype(np.float32) @ qvecs[i])
            lex_scores.append(bm25[i][rows])
        t2 = time.perf_counter()
        hits = self.ranker.rank(tokens, candidates, dense_scores, lex_scores,
                                [q.k for q in queries], [q.explain for q in queries])
        t3 = time.perf_counter()
        return [SearchOutcome(h, encode_s=t1 - t0, retrieve_s=t2 - t1, rank_s=t3 - t2, corrected_query=f or "")
                for h, f in zip(hits, fixed)]

    def _mask(self, filters: Filters) -> np.ndarray | None:
        """The filter's rows, less live deletions (None = everything)."""
        mask = filter_mask(self.bundle.items, filters)
        alive = self.bundle.alive
        if alive is None:
            return mask
        return alive.copy() if mask is None else mask & alive

    def row_of(self, item_id: str) -> int:
        row = self.bundle.items.id_to_row.get(item_id)
        if row is None:
            raise NotFound(f"item_id {item_id!r} is not in the catalog", field="item_id")
        return row

    def similar(self, item_id: str, k: int, filters: Filters = NO_FILTERS, explain: bool = False,
                rec=None) -> list[Hit]:
        """Items most like item_id (never itself): vector neighbours, plus the items bought or viewed
        with it when the bundle has a recommender, reranked with the similar-items weights."""
        source = self.row_of(item_id)
        mask = self._mask(filters)
        mask = np.ones(len(self.bundle.items), dtype=bool) if mask is None else mask.copy()
        mask[source] = False
        q = self.bundle.vectors[source].astype(np.float32)
        rows = self.dense.search_filtered(q, max(self.config.candidates, k), mask)
        co, co_weight = None, 0.0
        if rec is not None:
            extra = rec.co_neighbours(source, self.config.candidates)
            extra = extra[mask[extra]] if len(extra) else extra
            rows = np.union1d(rows, extra)
            co, co_weight = rec.similar_boost(source, rows), float(rec.spec.get("similar_co_weight", SIMILAR_CO_WEIGHT))
        rows = np.sort(rows)
        dense = self.bundle.vectors[rows].astype(np.float32) @ q
        return self.ranker.rank_similar(source, rows, dense, k, explain, co, co_weight)

    def warmup(self) -> None:
        """Compile the kernels and warm the encoder before the bundle takes traffic."""
        started = time.perf_counter()
        some = self.bundle.items.titles[: self.config.max_batch_size] or ["warm up"]
        self.search_batch([SearchQuery(text=t, k=10) for t in some])
        self.search_batch([SearchQuery(text=some[0], k=5, explain=True,
                                       filters=Filters(min_price=0.0, in_stock_only=True))])
        alive_ids = iter(self.bundle.items.id_to_row)
        first = next(alive_ids, None)
        if first is not None:
            self.similar(first, 5)
        log.info("warm-up done in %.2fs", time.perf_counter() - started)
