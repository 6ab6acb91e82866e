"""Recommend over one bundle: history -> sequence encoder (one forward pass per batch) -> FAISS top-N
over the recommender's item vectors -> REC features (kernels) -> linear re-scoring -> top k.

`recommend_batch` is the rec batcher's batch function. Histories arrive resolved to item rows by
the service (bundle history + live events + the request's recent items), so this module knows
nothing about users, logs or gRPC. A request without any history is a cold start: candidates are
the most popular items (bundle statistics plus live event counts) that pass its filters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from common.seqrec import SeqEncoder, left_pad
from kernels import features as K
from kernels import recfeatures as RK
from server.bundle import Bundle
from server.types import NO_FILTERS, Filters, Hit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecQuery:
    history: tuple[int, ...]  # item rows, oldest first (at most HISTORY_CAP)
    exclude: tuple[int, ...]  # rows never to recommend (already bought, being looked at)
    k: int
    filters: Filters = NO_FILTERS
    mask: np.ndarray | None = None  # filters (and live deletions) resolved to rows; None = everything


class RecEngine:
    """The bundle's sequence encoder and item vectors on one device."""

    def __init__(self, bundle: Bundle, device: str, candidates: int = 200) -> None:
        rec = bundle.rec
        if rec is None:
            raise ValueError("bundle has no recommender")
        spec = rec.spec
        self.spec = spec
        self.device = torch.device(device)
        self.candidates = candidates
        self.max_len = int(spec["max_len"])
        self.model = SeqEncoder(int(spec["dims"]), self.max_len, int(spec["layers"]), int(spec["heads"]), dropout=0.0)
        self.model.load_state_dict({k[len("encoder."):]: v for k, v in rec.state.items() if k.startswith("encoder.")})
        self.model.eval().to(self.device)
        proj = rec.state.get("text_proj.weight")
        self.text_proj = None if proj is None else proj.float().numpy()  # [d, text_dims]
        self.allow_repeats = bool(spec.get("allow_repeats", False))
        self.weights = rec.weights
        self.rec = rec
        self.set_vectors(rec.vectors, rec.popularity, bundle.items.category_id, bundle.items.price)

    def set_vectors(self, vectors: np.ndarray, popularity: np.ndarray, category_id: np.ndarray,
                    price: np.ndarray) -> None:
        """(Re)build the table and index for the current item rows (after live catalog changes too)."""
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        table = torch.zeros(len(vectors) + 1, vectors.shape[1])
        table[1:] = torch.from_numpy(self.vectors)
        self.table = table.to(self.device)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(self.vectors)
        self.base_popularity = np.asarray(popularity, np.float32)
        self.live_popularity = np.zeros(len(vectors), np.float32)
        self.category_id = np.asarray(category_id, np.int32)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.log_price = np.where(price > 0, np.log(np.where(price > 0, price, 1.0)), np.nan).astype(np.float32)

    def text_vector(self, text_vectors: np.ndarray) -> np.ndarray:
        """Item vectors for items nobody has interacted with: the projected text part (zeros without text)."""
        if self.text_proj is None:
            return np.zeros((len(text_vectors), self.vectors.shape[1]), np.float32)
        return (np.asarray(text_vectors, np.float32) @ self.text_proj.T).astype(np.float32)

    @torch.no_grad()
    def user_vectors(self, histories: list[tuple[int, ...]]) -> np.ndarray:
        seqs = left_pad([[r + 1 for r in h] for h in histories], self.max_len).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            out = self.model.user_vectors(seqs, self.table)
        return out.float().cpu().numpy()

    def popularity(self) -> np.ndarray:
        return self.base_popularity + self.live_popularity

    def _candidates(self, q: RecQuery, uv: np.ndarray | None, pop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.vectors)
        allowed = np.ones(n, bool) if q.mask is None else q.mask.copy()
        if q.exclude:
            allowed[list(q.exclude)] = False
        want = min(max(self.candidates, q.k), int(allowed.sum()))
        if want == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if uv is None:  # cold start: the most popular allowed items
            rows = np.flatnonzero(allowed)
            keep = np.argsort(-pop[rows], kind="stable")[:want]
            return np.sort(rows[keep]).astype(np.int64), np.zeros(want, np.float32)
        if q.mask is None and not q.exclude:
            rows = self.index.search(uv[None, :], want)[1][0]
            rows = rows[rows >= 0].astype(np.int64)
        else:
            # Exact over the allowed rows: the recommender's vectors are small (d <= 128).
            idx = np.flatnonzero(allowed)
            scores = self.vectors[idx] @ uv
            if want < len(idx):
                part = np.argpartition(-scores, want - 1)[:want]
                idx = idx[part]
            rows = idx.astype(np.int64)
        if self.allow_repeats and q.history:
            # Where people re-buy, their own past items are candidates whatever the model thinks.
            past = np.unique(np.asarray(q.history, np.int64))
            rows = np.union1d(rows, past[allowed[past]])
        rows = np.sort(rows)
        return rows, (self.vectors[rows] @ uv).astype(np.float32)

    def _fit(self, q: RecQuery) -> RecQuery:
        """A query resolved against a catalog one live change older or newer than this engine's: keep
        the rows this engine knows (rows never move, so the rest is exactly the same)."""
        n = len(self.vectors)
        mask = q.mask
        if mask is not None and len(mask) != n:
            mask = np.zeros(n, bool)
            m = min(n, len(q.mask))
            mask[:m] = q.mask[:m]
        if mask is q.mask and (not q.history or max(q.history) < n) and (not q.exclude or max(q.exclude) < n):
            return q
        return RecQuery(tuple(r for r in q.history if r < n), tuple(r for r in q.exclude if r < n), q.k, q.filters, mask)

    def recommend_batch(self, queries: list[RecQuery]) -> list[list[Hit]]:
        """Top k hits of each query, best first (the batcher's batch function)."""
        queries = [self._fit(q) for q in queries]
        with_hist = [i for i, q in enumerate(queries) if q.history]
        uvs = self.user_vectors([queries[i].history for i in with_hist]) if with_hist else None
        where = {i: j for j, i in enumerate(with_hist)}
        pop = self.popularity()
        cands, model_scores, hists = [], [], []
        for i, q in enumerate(queries):
            uv = uvs[where[i]] if i in where else None
            rows, scores = self._candidates(q, uv, pop)
            cands.append(rows)
            model_scores.append(scores)
            hists.append(np.asarray(q.history, np.int32))
        offsets = np.zeros(len(queries) + 1, np.int64)
        offsets[1:] = np.cumsum([len(c) for c in cands])
        flat = np.concatenate(cands).astype(np.int32) if cands else np.empty(0, np.int32)
        h_indptr = np.zeros(len(queries) + 1, np.int64)
        h_indptr[1:] = np.cumsum([len(h) for h in hists])
        h_flat = np.concatenate(hists) if hists else np.empty(0, np.int32)
        feats = RK.rec_features(offsets, flat, np.concatenate(model_scores).astype(np.float32), h_indptr, h_flat, pop,
                                self.rec.co_indptr, self.rec.co_indices, self.rec.co_weights, self.category_id,
                                self.log_price)
        scores = K.linear_scores(feats, self.weights, 0.0)
        for i, q in enumerate(queries):
            if not q.history:  # cold start: the popularity order itself, not the fitted re-scoring
                scores[offsets[i]:offsets[i + 1]] = feats[offsets[i]:offsets[i + 1], 1]
        ks = np.asarray([q.k for q in queries], np.int64)
        out_offsets, positions = K.topk_segments(scores, offsets, ks)
        results = []
        for u in range(len(queries)):
            picks = positions[out_offsets[u]:out_offsets[u + 1]]
            results.append([Hit(int(flat[p]), float(scores[p])) for p in picks])  # positions are absolute
        return results

    def similar_boost(self, source: int, rows: np.ndarray) -> np.ndarray:
        """Co-occurrence weight of each row with source (0 where none), for SimilarItems blending."""
        out = np.zeros(len(rows), np.float32)
        if source >= len(self.rec.co_indptr) - 1:
            return out
        lo, hi = self.rec.co_indptr[source], self.rec.co_indptr[source + 1]
        neigh, w = self.rec.co_indices[lo:hi], self.rec.co_weights[lo:hi]
        pos = np.searchsorted(neigh, rows)
        ok = (pos < len(neigh)) & (neigh[np.minimum(pos, len(neigh) - 1)] == rows) if len(neigh) else np.zeros(len(rows), bool)
        out[ok] = w[pos[ok]]
        return out

    def co_neighbours(self, source: int, n: int) -> np.ndarray:
        """Rows that co-occur most with source."""
        if source >= len(self.rec.co_indptr) - 1:
            return np.empty(0, np.int64)
        lo, hi = self.rec.co_indptr[source], self.rec.co_indptr[source + 1]
        order = np.argsort(-self.rec.co_weights[lo:hi], kind="stable")[:n]
        return self.rec.co_indices[lo:hi][order].astype(np.int64)


def warm(engine: RecEngine) -> None:
    """Compile the kernels and run the model once before traffic arrives."""
    n = len(engine.vectors)
    if n == 0:
        return
    engine.recommend_batch([RecQuery(history=(0,), exclude=(), k=5), RecQuery(history=(), exclude=(), k=5)])
    log.debug("recommender warm: %d items, repeats %s", n, engine.allow_repeats)

