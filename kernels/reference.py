"""Plain-numpy twins of `kernels.features`: slow, obvious, and the definition tests hold the kernels to."""
from __future__ import annotations

import numpy as np


def bm25_accumulate(q_indptr, q_tokens, csc_indptr, csc_indices, csc_data, n_docs):
    out = np.zeros((len(q_indptr) - 1, n_docs), dtype=np.float32)
    for q in range(len(q_indptr) - 1):
        for t in q_tokens[q_indptr[q] : q_indptr[q + 1]]:
            if t >= 0:
                sl = slice(csc_indptr[t], csc_indptr[t + 1])
                np.add.at(out[q], csc_indices[sl], csc_data[sl])
    return out


def topn_masked(scores, mask, n):
    ok = scores > 0
    if len(mask):
        ok &= mask.astype(bool)
    idx = np.flatnonzero(ok)
    order = np.lexsort((idx, -scores[idx]))
    return idx[order][:n].astype(np.int64)


def _share(needles, haystack):
    """Share of needles (distinct ids) found in haystack; 0 for no needles."""
    if len(needles) == 0:
        return 0.0
    return np.isin(needles, haystack).sum() / len(needles)


def _ranks_desc(values):
    order = np.lexsort((np.arange(len(values)), -values))
    ranks = np.empty(len(values), dtype=np.float32)
    ranks[order] = np.arange(len(values))
    return ranks


def rank_features(q_indptr, q_tokens, cand_offsets, cand_items, dense, lexical, title_indptr,
                  title_tokens, item_category, item_brand, cat_indptr, cat_tokens, brand_indptr,
                  brand_tokens, price, popularity, token_is_number):
    out = np.zeros((len(cand_items), 13), dtype=np.float32)
    for q in range(len(q_indptr) - 1):
        query = q_tokens[q_indptr[q] : q_indptr[q + 1]]
        numbers = np.array([t for t in query if t >= 0 and token_is_number[t]], dtype=np.int64)
        s, e = cand_offsets[q], cand_offsets[q + 1]
        best = max(lexical[s:e].max(initial=0.0), 0.0)
        for j in range(s, e):
            it = cand_items[j]
            title = title_tokens[title_indptr[it] : title_indptr[it + 1]]
            out[j, 0] = dense[j]
            out[j, 1] = lexical[j] / best if best > 0 else 0.0
            out[j, 2] = lexical[j]
            out[j, 3] = np.isin(query, title).sum() / len(query) if len(query) else 0.0
            out[j, 4] = np.isin(numbers, title).sum() / len(numbers) if len(numbers) else -1.0
            c, b = item_category[it], item_brand[it]
            if c >= 0:
                out[j, 5] = _share(cat_tokens[cat_indptr[c] : cat_indptr[c + 1]], query)
            if b >= 0:
                out[j, 6] = _share(brand_tokens[brand_indptr[b] : brand_indptr[b + 1]], query)
            out[j, 7] = np.log1p(price[it]) if np.isfinite(price[it]) and price[it] > 0 else 0.0
            out[j, 8] = popularity[it]
            out[j, 9] = len(query)
            out[j, 10] = len(title)
        out[s:e, 11] = _ranks_desc(dense[s:e])
        out[s:e, 12] = _ranks_desc(lexical[s:e])
    return out


def similar_features(src_category, src_brand, cand_items, dense, item_category, item_brand, popularity):
    out = np.zeros((len(cand_items), 4), dtype=np.float32)
    out[:, 0] = dense
    if src_category >= 0:
        out[:, 1] = item_category[cand_items] == src_category
    if src_brand >= 0:
        out[:, 2] = item_brand[cand_items] == src_brand
    out[:, 3] = popularity[cand_items]
    return out


def linear_scores(features, weights, bias):
    return (features.astype(np.float32) @ weights.astype(np.float32) + np.float32(bias)).astype(np.float32)


def topk_segments(scores, offsets, ks):
    out_offsets = [0]
    positions = []
    for q in range(len(offsets) - 1):
        s, e = offsets[q], offsets[q + 1]
        pos = np.arange(s, e)
        order = np.lexsort((pos, -scores[s:e]))[: ks[q]]
        positions.extend(pos[order])
        out_offsets.append(out_offsets[-1] + len(order))
    return np.asarray(out_offsets, dtype=np.int64), np.asarray(positions, dtype=np.int64)


def _walk(x, node_feature, node_threshold, node_left, node_right, root):
    path = [root]
    while node_feature[path[-1]] >= 0:
        n = path[-1]
        path.append(node_left[n] if float(x[node_feature[n]]) <= node_threshold[n] else node_right[n])
    return path


def tree_scores(features, node_feature, node_threshold, node_left, node_right, node_value, tree_roots):
    return np.array([
        sum(node_value[_walk(x, node_feature, node_threshold, node_left, node_right, r)[-1]] for r in tree_roots)
        for x in features
    ], dtype=np.float64)


def tree_contributions(x, node_feature, node_threshold, node_left, node_right, node_value, tree_roots, n_features):
    out = np.zeros(n_features + 1)
    for r in tree_roots:
        path = _walk(x, node_feature, node_threshold, node_left, node_right, r)
        out[n_features] += node_value[path[0]]
        for parent, child in zip(path, path[1:]):
            out[node_feature[parent]] += node_value[child] - node_value[parent]
    return out


# --- kernels.recfeatures ------------------------------------------------------------------------

def rec_features(cand_offsets, cand_items, model_scores, hist_indptr, hist_items, popularity,
                 co_indptr, co_indices, co_weights, item_category, log_price):
    from kernels.recfeatures import CO_DECAY, CO_RECENT, N_REC_FEATURES

    out = np.zeros((len(cand_items), N_REC_FEATURES), dtype=np.float32)
    co = {}
    for src in range(len(co_indptr) - 1):
        for p in range(co_indptr[src], co_indptr[src + 1]):
            co[(src, int(co_indices[p]))] = float(co_weights[p])
    for u in range(len(cand_offsets) - 1):
        hist = [int(h) for h in hist_items[hist_indptr[u]:hist_indptr[u + 1]]]
        cats = [int(item_category[h]) for h in hist]
        prices = [float(log_price[h]) for h in hist if not np.isnan(log_price[h])]
        for i in range(cand_offsets[u], cand_offsets[u + 1]):
            item = int(cand_items[i])
            out[i, 0] = model_scores[i]
            out[i, 1] = np.log1p(popularity[item])
            recent = hist[::-1][:CO_RECENT]
            out[i, 2] = sum(CO_DECAY ** n * co.get((h, item), 0.0) for n, h in enumerate(recent))
            if item_category[item] >= 0 and hist:
                out[i, 3] = cats.count(int(item_category[item])) / len(hist)
            if prices and not np.isnan(log_price[item]):
                out[i, 4] = -abs(log_price[item] - np.mean(prices))
            if item in hist:
                out[i, 5] = 1.0 / (1.0 + hist[::-1].index(item))
            out[i, 6] = np.log1p(hist.count(item))
    return out
