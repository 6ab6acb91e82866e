"""Every numba kernel against its numpy twin, on random inputs and edge sizes (0 and 1, ties)."""
from __future__ import annotations

import numpy as np
import pytest

from kernels import features as K
from kernels import reference as R


def _csr(rng, n_rows, vocab, max_len, allow_unknown=False):
    lists = []
    for _ in range(n_rows):
        m = int(rng.integers(0, max_len + 1))
        ids = set(rng.integers(0, vocab, size=m).tolist())
        if allow_unknown and rng.random() < 0.3:
            ids.add(-1)
        lists.append(sorted(ids))
    indptr = np.zeros(n_rows + 1, np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    flat = np.array([t for x in lists for t in x], dtype=np.int32)
    return indptr, flat


def _bm25_index(rng, vocab, n_docs):
    indptr = [0]
    indices, data = [], []
    for _ in range(vocab):
        docs = np.sort(rng.choice(n_docs, size=int(rng.integers(0, min(n_docs, 8) + 1)), replace=False))
        indices.extend(docs.tolist())
        data.extend(rng.random(len(docs)).astype(np.float32).tolist())
        indptr.append(len(indices))
    return np.array(indptr, np.int64), np.array(indices, np.int32), np.array(data, np.float32)


SIZES = [0, 1, 2, 7, 50]


@pytest.mark.parametrize("n_docs", [1, 5, 300])
@pytest.mark.parametrize("n_queries", [0, 1, 4])
def test_bm25_accumulate_matches_numpy(n_docs, n_queries):
    rng = np.random.default_rng(n_docs * 10 + n_queries)
    vocab = 30
    csc = _bm25_index(rng, vocab, n_docs)
    q_indptr, q_tokens = _csr(rng, n_queries, vocab, 5, allow_unknown=True)
    fast = K.bm25_accumulate(q_indptr, q_tokens, *csc, n_docs)
    slow = R.bm25_accumulate(q_indptr, q_tokens, *csc, n_docs)
    assert fast.shape == (n_queries, n_docs)
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_topn_masked_matches_numpy(size, masked):
    rng = np.random.default_rng(size)
    # Rounded scores force ties; zeros and negatives must never be returned.
    scores = np.round(rng.normal(size=size), 1).astype(np.float32)
    mask = rng.random(size) < 0.6 if masked else np.empty(0, dtype=np.bool_)
    for n in (0, 1, 3, size + 2):
        fast = K.topn_masked(scores, mask, n)
        slow = R.topn_masked(scores, mask, n)
        np.testing.assert_array_equal(fast, slow)
        assert (scores[fast] > 0).all()


def _rank_inputs(rng, n_queries, max_cands, n_items=40, vocab=25):
    q_indptr, q_tokens = _csr(rng, n_queries, vocab, 4, allow_unknown=True)
    counts = rng.integers(0, max_cands + 1, size=n_queries)
    cand_offsets = np.zeros(n_queries + 1, np.int64)
    cand_offsets[1:] = np.cumsum(counts)
    cand_items = np.concatenate([np.sort(rng.choice(n_items, size=c, replace=False)) for c in counts]
                                or [np.empty(0)]).astype(np.int64)
    n = len(cand_items)
    dense = np.round(rng.uniform(-1, 1, n), 1).astype(np.float32)  # ties exercise the rank features
    lexical = np.where(rng.random(n) < 0.5, 0, rng.random(n) * 10).astype(np.float32)
    title_indptr, title_tokens = _csr(rng, n_items, vocab, 6)
    n_cat, n_brand = 5, 6
    item_category = rng.integers(-1, n_cat, n_items).astype(np.int32)
    item_brand = rng.integers(-1, n_brand, n_items).astype(np.int32)
    cat_indptr, cat_tokens = _csr(rng, n_cat, vocab, 2)
    brand_indptr, brand_tokens = _csr(rng, n_brand, vocab, 2)
    price = np.where(rng.random(n_items) < 0.2, np.nan, rng.uniform(0, 500, n_items)).astype(np.float32)
    popularity = rng.random(n_items).astype(np.float32)
    token_is_number = rng.random(vocab) < 0.3
    return (q_indptr, q_tokens, cand_offsets, cand_items, dense, lexical, title_indptr, title_tokens,
            item_category, item_brand, cat_indptr, cat_tokens, brand_indptr, brand_tokens, price, popularity,
            token_is_number)


@pytest.mark.parametrize("n_queries,max_cands", [(0, 0), (1, 0), (1, 1), (3, 1), (4, 20), (16, 40)])
def test_rank_features_matches_numpy(n_queries, max_cands):
    rng = np.random.default_rng(n_queries * 100 + max_cands)
    args = _rank_inputs(rng, n_queries, max_cands)
    fast = K.rank_features(*args)
    slow = R.rank_features(*args)
    assert fast.shape == (len(args[3]), len(K.FEATURE_NAMES))
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert np.isfinite(fast).all()


@pytest.mark.parametrize("n", [0, 1, 30])
def test_similar_features_matches_numpy(n):
    rng = np.random.default_rng(n)
    n_items = 40
    cand = rng.choice(n_items, size=min(n, n_items), replace=False).astype(np.int64)
    dense = rng.random(len(cand)).astype(np.float32)
    cat = rng.integers(-1, 4, n_items).astype(np.int32)
    brand = rng.integers(-1, 4, n_items).astype(np.int32)
    pop = rng.random(n_items).astype(np.float32)
    for src_c, src_b in [(-1, -1), (1, 2)]:
        fast = K.similar_features(np.int32(src_c), np.int32(src_b), cand, dense, cat, brand, pop)
        slow = R.similar_features(src_c, src_b, cand, dense, cat, brand, pop)
        np.testing.assert_allclose(fast, slow, rtol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 6, 13, 200])
def test_linear_scores_matches_numpy(n):
    rng = np.random.default_rng(n)
    feats = rng.normal(size=(n, 7)).astype(np.float32)
    w = rng.normal(size=7).astype(np.float32)
    fast = K.linear_scores(feats, w, np.float32(0.25))
    np.testing.assert_allclose(fast, R.linear_scores(feats, w, 0.25), rtol=1e-5, atol=1e-5)
    # Each row is summed bias first, then in feature order, whatever its place in the 4-row blocks.
    for i in range(n):
        acc = np.float32(0.25)
        for c in range(7):
            acc = np.float32(acc + np.float32(feats[i, c] * w[c]))
        assert fast[i] == acc


@pytest.mark.parametrize("segments", [[], [0], [1], [0, 3, 1], [10, 10, 0, 5]])
def test_topk_segments_matches_numpy_with_ties(segments):
    rng = np.random.default_rng(len(segments))
    offsets = np.zeros(len(segments) + 1, np.int64)
    offsets[1:] = np.cumsum(segments)
    scores = np.round(rng.random(int(offsets[-1])), 1).astype(np.float32)  # many ties
    ks = rng.integers(1, 8, size=len(segments)).astype(np.int64)
    f_off, f_pos = K.topk_segments(scores, offsets, ks)
    s_off, s_pos = R.topk_segments(scores, offsets, ks)
    np.testing.assert_array_equal(f_off, s_off)
    np.testing.assert_array_equal(f_pos, s_pos)
    for q in range(len(segments)):
        picked = scores[f_pos[f_off[q]:f_off[q + 1]]]
        assert (np.diff(picked) <= 0).all(), "each segment comes back best first"


@pytest.mark.parametrize("seed", range(6))
def test_topk_segments_insertion_and_sort_paths_match_numpy(seed):
    # Segments of a rerank's size with picks on both sides of the insertion/sort switch (32),
    # heavy ties, -0.0 beside 0.0, infinities and NaNs (numpy ranks NaN last, in position order).
    rng = np.random.default_rng(seed)
    segments = rng.integers(0, 300, size=8)
    offsets = np.zeros(len(segments) + 1, np.int64)
    offsets[1:] = np.cumsum(segments)
    scores = rng.integers(-3, 4, int(offsets[-1])).astype(np.float64) / 2
    special = rng.random(len(scores))
    scores[special < 0.05] = np.nan
    scores[(special >= 0.05) & (special < 0.07)] = -np.inf
    scores[(special >= 0.07) & (special < 0.09)] = -0.0
    for dtype in (np.float32, np.float64):
        for ks in (rng.integers(1, 33, size=8), rng.integers(33, 400, size=8), np.full(8, 10)):
            ks = ks.astype(np.int64)
            f_off, f_pos = K.topk_segments(scores.astype(dtype), offsets, ks)
            s_off, s_pos = R.topk_segments(scores.astype(dtype), offsets, ks)
            np.testing.assert_array_equal(f_off, s_off)
            np.testing.assert_array_equal(f_pos, s_pos)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topn_masked_selection_path_matches_twin(seed):
    # Many positive scores (count >> n) with heavy ties: the kernel selects before it sorts.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 5000).astype(np.float32)  # values 0..5: zeros drop, ties everywhere
    mask = rng.random(5000) < 0.7
    for n in (1, 7, 100):
        np.testing.assert_array_equal(K.topn_masked(scores, np.empty(0, np.bool_), n),
                                      R.topn_masked(scores, np.empty(0, np.bool_), n))
        np.testing.assert_array_equal(K.topn_masked(scores, mask, n), R.topn_masked(scores, mask, n))
