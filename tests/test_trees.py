"""LambdaMART export: our numba tree kernel, its numpy twin and LightGBM's own predict agree."""
from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from kernels import FEATURE_NAMES
from kernels import reference as R
from kernels import trees as T
from training.reranker import export_lightgbm

F = len(FEATURE_NAMES)


@pytest.fixture(scope="module")
def ranker_model():
    rng = np.random.default_rng(0)
    n_q, per_q = 60, 25
    X = rng.normal(size=(n_q * per_q, F)).astype(np.float32)
    X[:, 4] = np.where(rng.random(len(X)) < 0.5, -1.0, np.round(rng.random(len(X)), 1))  # sentinel values
    y = np.clip((X[:, 0] * 2 + X[:, 3] + rng.normal(scale=0.5, size=len(X)) + 2).round(), 0, 6).astype(int)
    ds = lgb.Dataset(X, y, group=[per_q] * n_q)
    booster = lgb.train({"objective": "lambdarank", "num_leaves": 15, "min_data_in_leaf": 5, "verbosity": -1,
                         "label_gain": [i / 3 for i in range(7)], "seed": 1}, ds, num_boost_round=40)
    return booster, export_lightgbm(booster, num_iteration=40), X


def _args(t):
    return (t["node_feature"], t["node_threshold"], t["node_left"], t["node_right"], t["node_value"], t["tree_roots"])


def test_kernel_matches_lightgbm_predict(ranker_model):
    booster, trees, X = ranker_model
    ours = T.tree_scores(X, *_args(trees))
    theirs = booster.predict(X, raw_score=True)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert np.ptp(ours) > 0.1, "the model must actually discriminate"


@pytest.mark.parametrize("n", [0, 1, 7])
def test_kernel_matches_numpy_twin_on_edge_sizes(ranker_model, n):
    _, trees, X = ranker_model
    np.testing.assert_allclose(T.tree_scores(X[:n], *_args(trees)), R.tree_scores(X[:n], *_args(trees)), atol=1e-12)


def test_contributions_sum_to_score_and_match_twin(ranker_model):
    _, trees, X = ranker_model
    scores = T.tree_scores(X[:20], *_args(trees))
    for x, s in zip(X[:20], scores):
        fast = T.tree_contributions(x, *_args(trees), F)
        slow = R.tree_contributions(x, *_args(trees), F)
        np.testing.assert_allclose(fast, slow, atol=1e-12)
        assert fast.sum() == pytest.approx(s, abs=1e-9)


def test_thresholds_follow_lightgbm_left_on_equal(ranker_model):
    booster, trees, X = ranker_model
    # Rows sitting exactly on split thresholds take LightGBM's `x <= threshold -> left` branch.
    internal = np.flatnonzero(trees["node_feature"] >= 0)[:30]
    probe = np.repeat(X[:1], len(internal), axis=0)
    for r, node in enumerate(internal):
        probe[r, trees["node_feature"][node]] = np.float32(trees["node_threshold"][node])
    np.testing.assert_allclose(T.tree_scores(probe, *_args(trees)), booster.predict(probe, raw_score=True), atol=1e-6)
