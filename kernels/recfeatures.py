"""Compiled features for Recommend: each (user, candidate) pair gets REC_FEATURE_NAMES.

Batches use the same flat layout as `kernels.features`: user u owns candidates
cand_items[cand_offsets[u]:cand_offsets[u+1]] and history hist_items[hist_indptr[u]:hist_indptr[u+1]]
(item rows, oldest first). Co-occurrence is a CSR over items with sorted neighbour rows. The twin
of every kernel is in `kernels.reference`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

REC_FEATURE_NAMES = (
    "model",  # user vector . item vector (the sequence model's score)
    "popularity",  # log1p of the time-decayed interaction count (bundle + live events)
    "co_occurrence",  # co-occurrence with the user's last items, recent ones weighted more
    "category_affinity",  # share of the user's history in the candidate's category (0 when unknown)
    "price_affinity",  # -|log price - mean log price of the history|, 0 when unknown
    "recency",  # 1 / (1 + steps since the user last had this item), 0 if never
    "repeat_count",  # log1p(times the item occurs in the user's history): people re-buy favourites
)
N_REC_FEATURES = len(REC_FEATURE_NAMES)
CO_RECENT = 5  # how many of the last history items co-occurrence looks at
CO_DECAY = 0.7

_OPTS = dict(nogil=True, cache=True)


@njit(**_OPTS)
def _co_weight(co_indptr, co_indices, co_weights, src, dst):
    lo, hi = co_indptr[src], co_indptr[src + 1]
    while lo < hi:  # binary search for dst among src's sorted neighbours
        mid = (lo + hi) // 2
        if co_indices[mid] < dst:
            lo = mid + 1
        else:
            hi = mid
    if lo < co_indptr[src + 1] and co_indices[lo] == dst:
        return co_weights[lo]
    return np.float32(0.0)


@njit(**_OPTS)
def rec_features(cand_offsets, cand_items, model_scores, hist_indptr, hist_items, popularity,
                 co_indptr, co_indices, co_weights, item_category, log_price):
    """float32[n_candidates, N_REC_FEATURES]."""
    n_u = cand_offsets.shape[0] - 1
    out = np.zeros((cand_items.shape[0], N_REC_FEATURES), dtype=np.float32)
    n_cat = 0
    for i in range(item_category.shape[0]):
        if item_category[i] + 1 > n_cat:
            n_cat = item_category[i] + 1
    cat_count = np.zeros(max(n_cat, 1), dtype=np.float32)
    for u in range(n_u):
        h0, h1 = hist_indptr[u], hist_indptr[u + 1]
        n_hist = h1 - h0
        cat_count[:] = 0.0
        price_sum = 0.0
        price_n = 0
        for j in range(h0, h1):
            c = item_category[hist_items[j]]
            if c >= 0:
                cat_count[c] += 1.0
            lp = log_price[hist_items[j]]
            if not np.isnan(lp):
                price_sum += lp
                price_n += 1
        mean_price = price_sum / price_n if price_n > 0 else 0.0
        for i in range(cand_offsets[u], cand_offsets[u + 1]):
            item = cand_items[i]
            out[i, 0] = model_scores[i]
            out[i, 1] = np.log1p(popularity[item])
            co = 0.0
            w = 1.0
            j = h1 - 1
            while j >= h0 and j >= h1 - CO_RECENT:
                co += w * _co_weight(co_indptr, co_indices, co_weights, hist_items[j], item)
                w *= CO_DECAY
                j -= 1
            out[i, 2] = co
            c = item_category[item]
            if c >= 0 and n_hist > 0:
                out[i, 3] = cat_count[c] / n_hist
            lp = log_price[item]
            if price_n > 0 and not np.isnan(lp):
                out[i, 4] = -abs(lp - mean_price)
            count = 0
            j = h1 - 1
            while j >= h0:
                if hist_items[j] == item:
                    if count == 0:
                        out[i, 5] = 1.0 / (1.0 + (h1 - 1 - j))
                    count += 1
                j -= 1
            out[i, 6] = np.log1p(count)
    return out
