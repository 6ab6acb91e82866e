"""Train the recommender of a bundle and write its files (called from the bundle writer's hook).

Splits:
- `leave_one_out` (Beauty and any sequence file): train on all but each user's last two items,
  early-stop on the second-to-last; the bundle serves histories without the last item, so
  evaluation asks the served Recommend for each user and checks the held-out last item.
- `temporal` (Online Retail): everything before the cut-off is history; the model early-stops on
  each user's last item before the cut-off; evaluation checks purchases after it.
- `all` (a catalog with interactions): early-stop on each user's last item, serve everything.

The re-scoring weights over the kernels' features (model score, popularity, co-occurrence,
category and price affinity, recency) are fitted on the validation targets with statistics that
exclude them, using the same kernel the server runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from common import bundle_format as bf
from common.seqrec import HISTORY_CAP, left_pad
from kernels.recfeatures import REC_FEATURE_NAMES
from kernels import recfeatures as RK
from training.behaviour import Behaviour, co_occurrence, leave_one_out, popularity, repeat_rate, temporal_split
from training.recommender import SeqRecConfig, SeqSplit, train_seqrec
from training.tracking import NULL, Tracker

log = logging.getLogger(__name__)
REPEATS_AT = 0.05  # a repeat rate above this means users do re-buy: keep history items recommendable
FIT_USERS = 4000
FIT_CANDIDATES = 200
TEST_WINDOW_S = 30 * 86400  # temporal data: the validation window before the cut-off (as long as the test)


def _split(b: Behaviour, kind: str, cutoff: int | None) -> tuple[SeqSplit, list[list[int]], list[list[int]] | None]:
    """(training split with 1-based rows, served histories with 0-based rows, served times)."""
    n = len(b.items)
    if kind == "leave_one_out":
        train, valid, test = leave_one_out(b.sequences)
        served = [s[:-1] if len(s) >= 3 else list(s) for s in b.sequences]
        times = None if b.times is None else [t[:len(s)] for t, s in zip(b.times, served)]
        return SeqSplit(n, train, valid, test), served, times
    if kind == "temporal":
        served, _ = temporal_split(b, int(cutoff))
        times = [t[:len(s)] for t, s in zip(b.times, served)]
    else:
        served, times = [list(s) for s in b.sequences], b.times
    train = [[r + 1 for r in s[:-1]] if len(s) >= 2 else [r + 1 for r in s] for s in served]
    valid = [s[-1] + 1 if len(s) >= 2 else 0 for s in served]
    return SeqSplit(n, train, valid, [0] * len(served)), served, times


def _attributes(b: Behaviour) -> tuple[torch.Tensor | None, int]:
    if not b.attributes or not any(b.attributes):
        return None, 0
    width = max(len(a) for a in b.attributes)
    attrs = torch.zeros(len(b.items) + 1, width, dtype=torch.long)
    for r, a in enumerate(b.attributes):
        if a:
            attrs[r + 1, :len(a)] = torch.as_tensor(a) + 1
    return attrs, int(attrs.max())


def _csr(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(seqs) + 1, np.int64)
    indptr[1:] = np.cumsum([len(s) for s in seqs])
    items = np.fromiter((r for s in seqs for r in s), dtype=np.int32, count=int(indptr[-1]))
    return indptr, items


def log_prices(items: pd.DataFrame) -> np.ndarray:
    price = items["price"].astype(float).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(price > 0, np.log(np.where(price > 0, price, 1.0)), np.nan).astype(np.float32)


def category_ids(items: pd.DataFrame) -> np.ndarray:
    cats = items["category"].fillna("").astype(str).str.strip().str.lower()
    codes = {c: i for i, c in enumerate(sorted(set(cats) - {""}))}
    return np.array([codes.get(c, -1) for c in cats], np.int32)


def candidates_and_features(user_vecs: np.ndarray, table: np.ndarray, histories: list[list[int]],
                            allow_repeats: bool, n: int, stats: dict[str, np.ndarray], cat: np.ndarray,
                            logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The server's candidates (top-n by model score; seen items removed unless repeats are allowed,
    in which case the user's past items join) and their REC features. table: [items, d], 0-based rows.
    Returns (offsets, items, features)."""
    histories = [h[-HISTORY_CAP:] for h in histories]
    scores = user_vecs @ table.T
    n = min(n, scores.shape[1])
    cands, model = [], []
    for i, h in enumerate(histories):
        s = scores[i].copy()
        if not allow_repeats and h:
            s[h] = -np.inf
        top = np.argpartition(-s, n - 1)[:n]
        top = top[np.isfinite(s[top])]
        if allow_repeats and h:
            top = np.union1d(top, np.unique(h))
        top = np.sort(top)
        cands.append(top.astype(np.int32))
        model.append(scores[i, top].astype(np.float32))
    offsets = np.zeros(len(histories) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in cands])
    cand = np.concatenate(cands) if cands else np.empty(0, np.int32)
    h_indptr, h_items = _csr(histories)
    feats = RK.rec_features(offsets, cand, np.concatenate(model), h_indptr, h_items, stats["popularity"],
                            stats["co_indptr"], stats["co_indices"], stats["co_weights"], cat, logp)
    return offsets, cand, feats


def _ndcg(offsets: np.ndarray, cand: np.ndarray, scores: np.ndarray, targets: list[set[int]], k: int) -> float:
    total = 0.0
    for u, rel in enumerate(targets):
        s, e = offsets[u], offsets[u + 1]
        order = np.argsort(-scores[s:e], kind="stable")[:k]
        gains = np.array([1.0 if c in rel else 0.0 for c in cand[s:e][order]])
        ideal = (1.0 / np.log2(np.arange(min(len(rel), k)) + 2)).sum()
        total += float((gains / np.log2(np.arange(len(gains)) + 2)).sum()) / ideal
    return total / max(len(targets), 1)


def fit_weights(offsets: np.ndarray, cand: np.ndarray, feats: np.ndarray, targets: list[set[int]],
                k: int = 10) -> tuple[np.ndarray, float, float]:
    """Coordinate ascent on validation NDCG@k; the model score's weight stays 1."""
    w = np.zeros(feats.shape[1], np.float32)
    w[0] = 1.0
    base = _ndcg(offsets, cand, feats @ w, targets, k)
    best = base
    scale = float(np.std(feats[:, 0])) or 1.0
    grid = (-1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
    for _ in range(2):
        for f in range(1, feats.shape[1]):
            sd = float(np.std(feats[:, f]))
            if sd == 0.0:
                continue
            keep = w[f]
            for g in grid:
                w[f] = g * scale / sd
                score = _ndcg(offsets, cand, feats @ w, targets, k)
                if score > best + 1e-5:
                    best, keep = score, w[f]
            w[f] = keep
    return w, base, best


def build_recommender(root: Path | None, b: Behaviour, split_kind: str, cutoff: int | None, cfg: SeqRecConfig,
                      text_vectors: np.ndarray | None, use_text: bool, *, checkpoint: Path | None = None,
                      tracker: Tracker = NULL, init_state: dict[str, torch.Tensor] | None = None,
                      train_users: list[int] | None = None) -> dict[str, Any] | None:
    """Train, fit the re-scoring weights, write the recommender files into root; return the manifest part.

    Data-parallel: every rank calls this (training is collective); ranks other than 0 pass root=None and
    return None after training, rank 0 fits the weights and writes the files."""
    started = time.perf_counter()
    split, served, served_times = _split(b, split_kind, cutoff)
    text = None
    if use_text and text_vectors is not None:
        text = torch.zeros(len(b.items) + 1, text_vectors.shape[1])
        text[1:] = torch.as_tensor(text_vectors.astype(np.float32))
    attrs, n_attrs = _attributes(b)
    train_only = [[r - 1 for r in s] for s in split.train]
    rate = repeat_rate(train_only)
    allow_repeats = rate >= REPEATS_AT
    model, report = train_seqrec(split, cfg, text=text, attrs=attrs, n_attrs=n_attrs, exclude_seen=not allow_repeats,
                                 train_users=train_users, init_state=init_state, checkpoint=checkpoint,
                                 tracker=tracker)
    if root is None:
        return None
    with torch.no_grad():
        table = model.table().float().cpu()
    vectors = table[1:].numpy().astype(np.float32)

    # Re-scoring weights, fitted on validation targets with statistics that exclude them. Temporal
    # data mirrors its test protocol (every item of the last window before the cut-off, NDCG@20);
    # otherwise each user's next item (NDCG@10).
    cat, logp = category_ids(b.items), log_prices(b.items)
    if split_kind == "temporal":
        window = int(cutoff) - TEST_WINDOW_S
        fit_hist, fit_rel, fit_times = [], [], []
        for s_, t_ in zip(served, served_times):
            cut = int(np.searchsorted(np.asarray(t_), window, side="left"))
            fit_hist.append(s_[:cut]), fit_rel.append(set(s_[cut:])), fit_times.append(t_[:cut])
        users = [u for u in range(len(served)) if fit_hist[u] and fit_rel[u]]
        fit_stats, k_fit = _stats(fit_hist, len(b.items), fit_times), 20
    else:
        fit_hist = train_only
        fit_rel = [{v - 1} if v else set() for v in split.valid]
        users = [u for u in range(len(served)) if split.valid[u] and split.train[u]]
        train_times = None
        if b.times is not None and split_kind != "leave_one_out":
            train_times = [t[:len(s)] for t, s in zip(served_times, train_only)]
        fit_stats, k_fit = _stats(train_only, len(b.items), train_times), 10
    rng = np.random.default_rng(cfg.seed)
    if len(users) > FIT_USERS:
        users = sorted(rng.choice(users, FIT_USERS, replace=False).tolist())
    hist = [fit_hist[u] for u in users]
    with torch.no_grad():
        uv = model.encoder.user_vectors(left_pad([[r + 1 for r in h] for h in hist], cfg.max_len), table).numpy()
    offsets, cand, feats = candidates_and_features(uv, vectors, hist, allow_repeats, FIT_CANDIDATES, fit_stats, cat, logp)
    weights, base, fitted = fit_weights(offsets, cand, feats, [fit_rel[u] for u in users], k_fit)
    log.info("re-scoring weights %s: valid ndcg@%d %.4f -> %.4f", np.round(weights, 4).tolist(), k_fit, base, fitted)
    tracker.scalars("recommender/rescoring", {f"valid_ndcg@{k_fit}_model_only": base,
                                              f"valid_ndcg@{k_fit}_rescored": fitted}, report["epochs_run"])

    # Files.
    state = {f"encoder.{k}": v.contiguous() for k, v in model.encoder.state_dict().items()}
    if model.text_proj is not None:
        state["text_proj.weight"] = model.text_proj.weight.detach().contiguous()
    save_file(state, str(root / bf.REC_MODEL_FILE))
    np.save(root / bf.REC_VECTORS_FILE, vectors)
    pd.DataFrame({"user_id": b.users}).to_parquet(root / bf.REC_USERS_FILE, index=False)
    indptr = write_history(root / bf.REC_HISTORY_FILE, served, served_times)
    np.savez(root / bf.REC_STATS_FILE, **_stats(served, len(b.items), served_times))
    cfg_d = asdict(cfg)
    return {
        "model": bf.REC_MODEL_FILE, "vectors": bf.REC_VECTORS_FILE, "users": bf.REC_USERS_FILE,
        "history": bf.REC_HISTORY_FILE, "stats": bf.REC_STATS_FILE,
        "dims": cfg.dims, "max_len": cfg.max_len, "layers": cfg.layers, "heads": cfg.heads,
        "text_projection": model.text_proj is not None, "attributes": n_attrs > 0,
        "features": list(REC_FEATURE_NAMES), "weights": [float(x) for x in weights],
        "valid_ndcg_model_only": round(base, 5), "valid_ndcg_rescored": round(fitted, 5), "valid_k": k_fit,
        "repeat_rate": round(rate, 4), "allow_repeats": allow_repeats,
        "split": {"kind": split_kind, "cutoff": cutoff},
        "source": b.source, "user_count": len(b.users), "interactions": int(indptr[-1]),
        "training": {k: v for k, v in report.items() if k != "config"}, "config": cfg_d,
        "world_size": report["world_size"], "effective_batch_size": report["effective_batch_size"],
        "learning_rate": report["learning_rate"],
        # The newest interaction the build read (unix s; None without times): `training update` takes the
        # events logged after it.
        "data_until": max((t[-1] for t in b.times if t), default=None) if b.times else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def write_history(path: Path, seqs: list[list[int]], times: list[list[int]] | None) -> np.ndarray:
    """The served histories file (CSR indptr + item rows, and unix-second times when known, so an incremental
    update keeps the time-decayed popularity); returns indptr."""
    indptr, items = _csr(seqs)
    extra = {}
    if times is not None:
        extra["times"] = np.fromiter((t for ts in times for t in ts), dtype=np.int64, count=int(indptr[-1]))
    np.savez(path, indptr=indptr, items=items, **extra)
    return indptr


def _stats(seqs: list[list[int]], n: int, times: list[list[int]] | None) -> dict[str, np.ndarray]:
    co_indptr, co_indices, co_weights = co_occurrence(seqs, n)
    return {"popularity": popularity(seqs, n, times), "co_indptr": co_indptr, "co_indices": co_indices,
            "co_weights": co_weights}
