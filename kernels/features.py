"""Compiled kernels: BM25 accumulation, masked top-n, reranking features, linear scoring, top-k.

Batches are flat arrays with offsets: query q owns q_tokens[q_indptr[q]:q_indptr[q+1]] (unique,
sorted ascending, -1 for a word outside the vocabulary) and candidates
cand_items[cand_offsets[q]:cand_offsets[q+1]]. Every kernel here has a twin of the same name in
`kernels.reference`; tests compare the two.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# The reranker's feature schema, in column order. Bundles record it; a bundle whose reranker was
# trained on another schema is refused.
FEATURE_NAMES = (
    "dense",  # cosine of query and item vectors
    "lexical",  # BM25 score divided by the best BM25 score among the query's candidates
    "bm25",  # raw BM25 score
    "coverage",  # share of the query's distinct terms found in the title
    "number_match",  # share of the query's numbers found in the title; -1 when the query has none
    "category_match",  # share of the category's terms found in the query
    "brand_match",  # share of the brand's terms found in the query
    "log_price",  # log1p(price), 0 when unknown
    "popularity",  # item popularity in [0, 1]
    "query_terms",  # distinct terms in the query
    "title_terms",  # distinct terms in the title
    "dense_rank",  # rank of the dense score among the query's candidates (0 = best)
    "lexical_rank",  # rank of the BM25 score among the query's candidates (0 = best)
)
N_FEATURES = len(FEATURE_NAMES)
SIMILAR_FEATURE_NAMES = ("dense", "same_category", "same_brand", "popularity")

_OPTS = dict(nogil=True, cache=True)


@njit(**_OPTS)
def bm25_accumulate(q_indptr, q_tokens, csc_indptr, csc_indices, csc_data, n_docs):
    """BM25 score of every document for every query: float32[Q, n_docs]."""
    n_q = q_indptr.shape[0] - 1
    out = np.zeros((n_q, n_docs), dtype=np.float32)
    for q in range(n_q):
        for j in range(q_indptr[q], q_indptr[q + 1]):
            t = q_tokens[j]
            if t < 0:
                continue
            for p in range(csc_indptr[t], csc_indptr[t + 1]):
                out[q, csc_indices[p]] += csc_data[p]
    return out


@njit(**_OPTS)
def topn_masked(scores, mask, n):
    """Indices of the n best positive scores (mask empty = all allowed), best first, ties by index."""
    use_mask = mask.shape[0] > 0
    count = 0
    for i in range(scores.shape[0]):
        if scores[i] > 0 and (not use_mask or mask[i]):
            count += 1
    idx = np.empty(count, dtype=np.int64)
    c = 0
    for i in range(scores.shape[0]):
        if scores[i] > 0 and (not use_mask or mask[i]):
            idx[c] = i
            c += 1
    vals = np.empty(count, dtype=np.float32)
    for i in range(count):
        vals[i] = -scores[idx[i]]
    m = min(n, count)
    if m == 0:
        return idx[:0]
    if count > 4 * m:
        # Select first: only entries at least as good as the m-th best need sorting (ties kept, so
        # the order among equals stays by index).
        cut = np.partition(vals.copy(), m - 1)[m - 1]
        keep = 0
        for i in range(count):
            if vals[i] <= cut:
                idx[keep] = idx[i]
                vals[keep] = vals[i]
                keep += 1
        idx, vals = idx[:keep], vals[:keep]
    order = np.argsort(vals, kind="mergesort")
    return idx[order[:m]]


@njit(**_OPTS)
def _count_in(sorted_needles_haystack, lo, hi, tokens, t_lo, t_hi):
    """How many of tokens[t_lo:t_hi] occur in the sorted slice sorted_needles_haystack[lo:hi]."""
    found = 0
    for p in range(t_lo, t_hi):
        t = tokens[p]
        a, b = lo, hi
        while a < b:
            mid = (a + b) // 2
            if sorted_needles_haystack[mid] < t:
                a = mid + 1
            else:
                b = mid
        if a < hi and sorted_needles_haystack[a] == t:
            found += 1
    return found


@njit(**_OPTS)
def _ranks_desc(values, s, e, out, col):
    """Write the descending rank (0 = best, ties by position) of values[s:e] into out[s:e, col]."""
    neg = np.empty(e - s, dtype=np.float32)
    for j in range(s, e):
        neg[j - s] = -values[j]
    order = np.argsort(neg, kind="mergesort")
    for r in range(e - s):
        out[s + order[r], col] = r


@njit(**_OPTS)
def rank_features(
    q_indptr,
    q_tokens,
    cand_offsets,
    cand_items,
    dense,
    lexical,
    title_indptr,
    title_tokens,
    item_category,
    item_brand,
    cat_indptr,
    cat_tokens,
    brand_indptr,
    brand_tokens,
    price,
    popularity,
    token_is_number,
):
    """Feature matrix float32[N, len(FEATURE_NAMES)] for all candidates of a batch."""
    n = cand_items.shape[0]
    out = np.zeros((n, 13), dtype=np.float32)
    n_q = q_indptr.shape[0] - 1
    for q in range(n_q):
        ql, qh = q_indptr[q], q_indptr[q + 1]
        n_terms = qh - ql
        n_numbers = 0
        for p in range(ql, qh):
            if q_tokens[p] >= 0 and token_is_number[q_tokens[p]]:
                n_numbers += 1
        s, e = cand_offsets[q], cand_offsets[q + 1]
        best = np.float32(0.0)
        for j in range(s, e):
            if lexical[j] > best:
                best = lexical[j]
        for j in range(s, e):
            it = cand_items[j]
            tl, th = title_indptr[it], title_indptr[it + 1]
            out[j, 0] = dense[j]
            if best > 0:
                out[j, 1] = lexical[j] / best
            out[j, 2] = lexical[j]
            if n_terms > 0:
                out[j, 3] = _count_in(q_tokens, ql, qh, title_tokens, tl, th) / n_terms
            if n_numbers > 0:
                found = 0
                for p in range(tl, th):
                    t = title_tokens[p]
                    if token_is_number[t] and _count_in(q_tokens, ql, qh, title_tokens, p, p + 1) > 0:
                        found += 1
                out[j, 4] = found / n_numbers
            else:
                out[j, 4] = -1.0
            c = item_category[it]
            if c >= 0 and cat_indptr[c + 1] > cat_indptr[c]:
                hits = _count_in(q_tokens, ql, qh, cat_tokens, cat_indptr[c], cat_indptr[c + 1])
                out[j, 5] = hits / (cat_indptr[c + 1] - cat_indptr[c])
            b = item_brand[it]
            if b >= 0 and brand_indptr[b + 1] > brand_indptr[b]:
                hits = _count_in(q_tokens, ql, qh, brand_tokens, brand_indptr[b], brand_indptr[b + 1])
                out[j, 6] = hits / (brand_indptr[b + 1] - brand_indptr[b])
            p = price[it]
            if np.isfinite(p) and p > 0:
                out[j, 7] = np.log1p(p)
            out[j, 8] = popularity[it]
            out[j, 9] = n_terms
            out[j, 10] = th - tl
        _ranks_desc(dense, s, e, out, 11)
        _ranks_desc(lexical, s, e, out, 12)
    return out


@njit(**_OPTS)
def similar_features(src_category, src_brand, cand_items, dense, item_category, item_brand, popularity):
    """Feature matrix float32[N, len(SIMILAR_FEATURE_NAMES)] for neighbours of one source item."""
    n = cand_items.shape[0]
    out = np.zeros((n, 4), dtype=np.float32)
    for j in range(n):
        it = cand_items[j]
        out[j, 0] = dense[j]
        if src_category >= 0 and item_category[it] == src_category:
            out[j, 1] = 1.0
        if src_brand >= 0 and item_brand[it] == src_brand:
            out[j, 2] = 1.0
        out[j, 3] = popularity[it]
    return out


@njit(**_OPTS)
def linear_scores(features, weights, bias):
    """features @ weights + bias, float32[N], summed in feature order (as explain reports it).

    Four rows at a time: one row's sum is a chain of dependent adds (latency-bound, ~2 cycles a
    term); four independent chains keep the FPU busy. Same order of additions, so the same bits.
    """
    n, f = features.shape
    out = np.empty(n, dtype=np.float32)
    m = n - n % 4
    for i in range(0, m, 4):
        a0 = np.float32(bias)
        a1 = np.float32(bias)
        a2 = np.float32(bias)
        a3 = np.float32(bias)
        for c in range(f):
            w = weights[c]
            a0 += features[i, c] * w
            a1 += features[i + 1, c] * w
            a2 += features[i + 2, c] * w
            a3 += features[i + 3, c] * w
        out[i] = a0
        out[i + 1] = a1
        out[i + 2] = a2
        out[i + 3] = a3
    for i in range(m, n):
        acc = np.float32(bias)
        for c in range(f):
            acc += features[i, c] * weights[c]
        out[i] = acc
    return out


# Above this many picks a segment is sorted whole; below it an insertion buffer of the best m is
# cheaper (a rerank keeps 10 of ~200 candidates: ~200 compares against sorting 200).
_TOPK_INSERT_MAX = 32


@njit(**_OPTS)
def topk_segments(scores, offsets, ks):
    """Per segment q, positions of its ks[q] best scores, best first, ties by position.

    Returns (out_offsets, positions): segment q's picks are positions[out_offsets[q]:out_offsets[q+1]].
    NaN scores rank below every number, as in numpy's sort.
    """
    n_q = offsets.shape[0] - 1
    out_offsets = np.zeros(n_q + 1, dtype=np.int64)
    for q in range(n_q):
        out_offsets[q + 1] = out_offsets[q] + min(ks[q], offsets[q + 1] - offsets[q])
    positions = np.empty(out_offsets[n_q], dtype=np.int64)
    for q in range(n_q):
        s, e = offsets[q], offsets[q + 1]
        m = out_offsets[q + 1] - out_offsets[q]
        base = out_offsets[q]
        if m == 0:
            continue
        if m > _TOPK_INSERT_MAX:
            neg = np.empty(e - s, dtype=scores.dtype)
            for j in range(s, e):
                neg[j - s] = -scores[j]
            order = np.argsort(neg, kind="mergesort")
            for j in range(m):
                positions[base + j] = s + order[j]
            continue
        # positions[base:base+filled] holds the best so far, best first; a later position only
        # enters ahead of strictly lower scores, so ties keep position order.
        filled = 0
        for j in range(s, e):
            v = scores[j]
            if v != v:  # NaN: after every number, in position order
                if filled < m:
                    positions[base + filled] = j
                    filled += 1
                continue
            if filled == m:
                last = scores[positions[base + m - 1]]
                if not (v > last or last != last):
                    continue
                p = m - 1
            else:
                p = filled
                filled += 1
            while p > 0:
                w = scores[positions[base + p - 1]]
                if v > w or w != w:
                    positions[base + p] = positions[base + p - 1]
                    p -= 1
                else:
                    break
            positions[base + p] = j
    return out_offsets, positions
