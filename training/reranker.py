"""Learned reranker: LambdaMART (lightgbm lambdarank) on the features the server computes.

Candidates are gathered the way the server gathers them (dense top-N from the bundle's FAISS index
united with BM25 top-N from its lexical index, scored by the same `kernels`), features come from
`kernels.features.rank_features`, and the trained trees are exported into flat arrays that
`kernels.trees` evaluates in the server. Labels: graded relevance (relevance - 1, in thirds);
unjudged candidates count as 0, exactly as evaluation counts them.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import lightgbm as lgb
import numpy as np
import pandas as pd

from common import bundle_format as bf
from common.encoding import TextEncoder
from common.spelling import Speller
from common.text import number_tokens, term_ids
from kernels import FEATURE_NAMES
from kernels import features as K

log = logging.getLogger(__name__)
TREES_FILE = "reranker_trees.npz"


@dataclass
class CandidateSet:
    """Candidates of a list of queries with their feature matrix (flat, with offsets)."""

    queries: list[str]
    offsets: np.ndarray
    rows: np.ndarray
    features: np.ndarray


class StageSearcher:
    """Reads a (stage) bundle's retrieval artifacts and gathers candidates + features like the server."""

    def __init__(self, bundle: Path, device: str = "cpu", candidates: int = 100, dtype: str = "float32") -> None:
        manifest = bf.read_manifest(bundle)
        self.candidates = candidates
        self.items = pd.read_parquet(bundle / manifest["items"]["file"])
        self.vectors = np.load(bundle / manifest["items"]["vectors"], allow_pickle=False).astype(np.float32)
        self.index = faiss.read_index(str(bundle / manifest["index"]["file"]))
        lex = np.load(bundle / manifest["lexical"]["file"], allow_pickle=False)
        self.lex = {k: lex[k] for k in lex.files}
        words = json.loads((bundle / manifest["lexical"]["vocab"]).read_text(encoding="utf-8"))
        self.vocab = {w: i for i, w in enumerate(words)}
        self.is_number = number_tokens(words)
        self.popularity = np.load(bundle / manifest["popularity"]["file"], allow_pickle=False).astype(np.float32)
        enc = manifest["encoder"]
        self.encoder = TextEncoder(bundle / enc["path"], device=device, dtype=dtype,
                                   max_length=int(enc.get("max_length", 128)))
        n = len(self.items)
        # Home Depot and most judgment sets carry no category/brand; the kernels take empty tables then.
        self._no_ids = np.full(n, -1, dtype=np.int32)
        self._empty_csr = (np.zeros(1, np.int64), np.zeros(0, np.int32))
        self.price = self.items["price"].astype("float64").to_numpy(dtype=np.float32, na_value=np.nan)
        # The server corrects query spelling for bundles that say so; training must see the same queries.
        self.speller = (Speller(self.items["title"].astype(str).tolist(), words)
                        if manifest["lexical"].get("spelling") == "titles" else None)

    def gather(self, queries: list[str], batch: int = 64) -> CandidateSet:
        offsets, rows, feats = [0], [], []
        for s in range(0, len(queries), batch):
            qs = queries[s : s + batch]
            if self.speller is not None:
                qs = [self.speller.correct(q) or q for q in qs]
            qv = self.encoder.encode(qs, batch_size=batch)
            dense_rows = self.index.search(qv, self.candidates)[1]
            toks = [term_ids(q, self.vocab) for q in qs]
            q_indptr = np.zeros(len(qs) + 1, np.int64)
            q_indptr[1:] = np.cumsum([len(t) for t in toks])
            q_flat = np.concatenate(toks).astype(np.int32)
            bm25 = K.bm25_accumulate(q_indptr, q_flat, self.lex["bm25_indptr"], self.lex["bm25_indices"],
                                     self.lex["bm25_data"], len(self.items))
            cands, dense, lexical = [], [], []
            for i in range(len(qs)):
                lex_rows = K.topn_masked(bm25[i], np.empty(0, np.bool_), self.candidates)
                r = np.union1d(dense_rows[i][dense_rows[i] >= 0], lex_rows)
                cands.append(r)
                dense.append((self.vectors[r] @ qv[i]).astype(np.float32))
                lexical.append(bm25[i][r])
            c_off = np.zeros(len(qs) + 1, np.int64)
            c_off[1:] = np.cumsum([len(c) for c in cands])
            cat_csr = self._empty_csr
            f = K.rank_features(q_indptr, q_flat, c_off, np.concatenate(cands).astype(np.int64),
                                np.concatenate(dense), np.concatenate(lexical), self.lex["title_indptr"],
                                self.lex["title_tokens"], self._no_ids, self._no_ids, *cat_csr, *cat_csr,
                                self.price, self.popularity, self.is_number)
            for c in cands:
                offsets.append(offsets[-1] + len(c))
            rows.extend(cands)
            feats.append(f)
        return CandidateSet(queries, np.asarray(offsets, np.int64), np.concatenate(rows), np.concatenate(feats))


def labels_for(cs: CandidateSet, grades: dict[str, dict[int, float]]) -> np.ndarray:
    """Integer grade per candidate: round(3 * (relevance - 1)) in 0..6; unjudged -> 0."""
    y = np.zeros(len(cs.rows), dtype=np.int32)
    for qi, q in enumerate(cs.queries):
        g = grades.get(q, {})
        for j in range(cs.offsets[qi], cs.offsets[qi + 1]):
            rel = g.get(int(cs.rows[j]))
            if rel is not None:
                y[j] = int(round(3 * (rel - 1)))
    return y


def train_lambdamart(train: CandidateSet, y_train: np.ndarray, valid: CandidateSet, y_valid: np.ndarray,
                     seed: int = 0) -> tuple[lgb.Booster, dict]:
    params = {
        "objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [10],
        "label_gain": [i / 3 for i in range(7)],  # gain = relevance - 1, as evaluation counts it
        "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50, "feature_fraction": 0.9,
        "bagging_fraction": 0.8, "bagging_freq": 1, "lambdarank_truncation_level": 30,
        "num_threads": 2, "seed": seed, "verbosity": -1, "deterministic": True,
    }
    started = time.perf_counter()
    dtrain = lgb.Dataset(train.features, y_train, group=np.diff(train.offsets), feature_name=list(FEATURE_NAMES))
    dvalid = lgb.Dataset(valid.features, y_valid, group=np.diff(valid.offsets), reference=dtrain)
    booster = lgb.train(params, dtrain, num_boost_round=600, valid_sets=[dvalid],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    info = {"params": params, "best_iteration": booster.best_iteration,
            "valid_ndcg@10": booster.best_score["valid_0"]["ndcg@10"], "seconds": time.perf_counter() - started,
            "train_rows": len(y_train), "train_queries": len(train.queries), "valid_queries": len(valid.queries),
            "importance_gain": dict(zip(FEATURE_NAMES, booster.feature_importance("gain").round(1).tolist()))}
    return booster, info


def export_lightgbm(booster: lgb.Booster, num_iteration: int | None = None) -> dict[str, np.ndarray]:
    """Flatten a LightGBM model into the node arrays `kernels.trees` evaluates."""
    dump = booster.dump_model(num_iteration=num_iteration or booster.best_iteration or None)
    feature, threshold, left, right, value, roots = [], [], [], [], [], []

    def add(node) -> tuple[int, float, float]:
        """Append node (and its subtree); returns (index, expected value, sample count)."""
        idx = len(feature)
        feature.append(-1), threshold.append(0.0), left.append(-1), right.append(-1), value.append(0.0)
        if "leaf_index" in node or "leaf_value" in node and "split_feature" not in node:
            value[idx] = float(node["leaf_value"])
            return idx, value[idx], float(node.get("leaf_count", 1) or 1)
        if node.get("decision_type", "<=") != "<=":
            raise ValueError(f"unsupported split {node.get('decision_type')!r} (categorical features are not used)")
        li, lv, lc = add(node["left_child"])
        ri, rv, rc = add(node["right_child"])
        feature[idx], threshold[idx], left[idx], right[idx] = int(node["split_feature"]), float(node["threshold"]), li, ri
        count = lc + rc
        value[idx] = (lv * lc + rv * rc) / count
        return idx, value[idx], count

    for tree in dump["tree_info"]:
        roots.append(add(tree["tree_structure"])[0])
    return {
        "node_feature": np.asarray(feature, np.int32), "node_threshold": np.asarray(threshold, np.float64),
        "node_left": np.asarray(left, np.int32), "node_right": np.asarray(right, np.int32),
        "node_value": np.asarray(value, np.float64), "tree_roots": np.asarray(roots, np.int32),
    }
