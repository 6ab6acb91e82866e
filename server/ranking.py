"""Reranking: build the feature matrix of every candidate of a batch with the kernels, score it with
the bundle's reranker and keep each query's top k, with per-feature contributions on request."""
from __future__ import annotations

import numpy as np

from kernels import features as K
from kernels import trees as T
from server.bundle import Bundle
from server.types import Contribution, Hit


def _flat(arrays: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)
    return offsets, flat


def _explain(names: tuple[str, ...], values: np.ndarray, weights: np.ndarray, bias: float) -> tuple[Contribution, ...]:
    parts = [Contribution(n, float(v), float(v) * float(w)) for n, v, w in zip(names, values, weights)]
    parts.append(Contribution("bias", 1.0, float(bias)))
    return tuple(parts)


class Ranker:
    """Scores candidates with the bundle's linear reranker (weights in the manifest's feature order)."""

    def __init__(self, bundle: Bundle) -> None:
        self.items = bundle.items
        self.lex = bundle.lexical
        self.popularity = bundle.popularity
        self.model = bundle.reranker

    def features(self, q_tokens: list[np.ndarray], candidates: list[np.ndarray], dense: list[np.ndarray],
                 lexical: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(features, scores, candidate offsets, candidate rows) of a batch, flattened query after query."""
        q_indptr, q_flat = _flat(q_tokens, np.int32)
        cand_offsets, cand_items = _flat(candidates, np.int64)
        _, dense_flat = _flat(dense, np.float32)
        _, lex_flat = _flat(lexical, np.float32)
        it = self.items
        feats = K.rank_features(
            q_indptr, q_flat, cand_offsets, cand_items, dense_flat, lex_flat,
            self.lex.title_indptr, self.lex.title_tokens, it.category_id, it.brand_id,
            it.cat_indptr, it.cat_tokens, it.brand_indptr, it.brand_tokens, it.price, self.popularity,
            self.lex.token_is_number,
        )
        return feats, self._score(feats), cand_offsets, cand_items

    def rank(
        self,
        q_tokens: list[np.ndarray],
        candidates: list[np.ndarray],
        dense: list[np.ndarray],
        lexical: list[np.ndarray],
        ks: list[int],
        explain: list[bool],
    ) -> list[list[Hit]]:
        """Top ks[q] hits of each query among its candidates (rows), best first."""
        feats, scores, cand_offsets, cand_items = self.features(q_tokens, candidates, dense, lexical)
        out_offsets, positions = K.topk_segments(scores, cand_offsets, np.asarray(ks, dtype=np.int64))
        results = []
        for q in range(len(ks)):
            picks = positions[out_offsets[q] : out_offsets[q + 1]]
            results.append([
                Hit(int(cand_items[p]), float(scores[p]), self.explain(feats[p]) if explain[q] else ())
                for p in picks
            ])
        return results

    def _score(self, feats: np.ndarray) -> np.ndarray:
        m = self.model
        if m.kind == "linear":
            return K.linear_scores(feats, m.weights, np.float32(m.bias))
        t = m.trees
        return T.tree_scores(feats, t["node_feature"], t["node_threshold"], t["node_left"], t["node_right"],
                             t["node_value"], t["tree_roots"])

    def explain(self, row: np.ndarray) -> tuple[Contribution, ...]:
        m = self.model
        if m.kind == "linear":
            return _explain(m.features, row, m.weights, m.bias)
        t = m.trees
        parts = T.tree_contributions(row, t["node_feature"], t["node_threshold"], t["node_left"], t["node_right"],
                                     t["node_value"], t["tree_roots"], len(m.features))
        out = [Contribution(n, float(v), float(c)) for n, v, c in zip(m.features, row, parts[:-1])]
        out.append(Contribution("bias", 1.0, float(parts[-1])))
        return tuple(out)

    def rank_similar(self, source: int, candidates: np.ndarray, dense: np.ndarray, k: int, explain: bool,
                     co: np.ndarray | None = None, co_weight: float = 0.0) -> list[Hit]:
        it = self.items
        feats = K.similar_features(np.int32(it.category_id[source]), np.int32(it.brand_id[source]),
                                   candidates.astype(np.int64), dense.astype(np.float32),
                                   it.category_id, it.brand_id, self.popularity)
        m = self.model
        scores = K.linear_scores(feats, m.similar_weights, np.float32(m.similar_bias))
        if co is not None:
            scores = scores + np.float32(co_weight) * co.astype(np.float32)
        offsets = np.array([0, len(candidates)], dtype=np.int64)
        _, positions = K.topk_segments(scores, offsets, np.array([k], dtype=np.int64))
        hits = []
        for p in positions:
            why: tuple[Contribution, ...] = ()
            if explain:
                why = _explain(m.similar_features, feats[p], m.similar_weights, m.similar_bias)
                if co is not None:
                    why = why + (Contribution("co_occurrence", float(co[p]), float(co_weight * co[p])),)
            hits.append(Hit(int(candidates[p]), float(scores[p]), why))
        return hits
