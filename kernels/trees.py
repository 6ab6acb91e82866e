"""Gradient-boosted tree ensembles (LambdaMART) evaluated by numba, with per-feature contributions.

The trees of a model are flattened into node arrays (see `training.reranker.export_lightgbm`):
node_feature[n] (-1 for a leaf), node_threshold[n], node_left[n], node_right[n], node_value[n]
(the leaf output for a leaf, the mean output below it for an internal node) and tree_roots[t].
Decisions follow LightGBM's numerical rule: go left when x <= threshold. Scores are float64, like
LightGBM's own predict. Contributions are path attributions (Saabas): each split on the path credits
its feature with the change of the expected output, so the contributions plus the ensemble's
expected value (`bias`) sum exactly to the score.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = dict(nogil=True, cache=True)


@njit(**_OPTS)
def _leaf(x, node_feature, node_threshold, node_left, node_right, root):
    n = root
    while node_feature[n] >= 0:
        if np.float64(x[node_feature[n]]) <= node_threshold[n]:
            n = node_left[n]
        else:
            n = node_right[n]
    return n


@njit(**_OPTS)
def tree_scores(features, node_feature, node_threshold, node_left, node_right, node_value, tree_roots):
    """Ensemble output float64[N] for features float32[N, F]."""
    n = features.shape[0]
    out = np.zeros(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for t in range(tree_roots.shape[0]):
            acc += node_value[_leaf(features[i], node_feature, node_threshold, node_left, node_right, tree_roots[t])]
        out[i] = acc
    return out


@njit(**_OPTS)
def tree_contributions(x, node_feature, node_threshold, node_left, node_right, node_value, tree_roots, n_features):
    """Per-feature contributions float64[F + 1] of one row; the last entry is the expected value (bias)."""
    out = np.zeros(n_features + 1, dtype=np.float64)
    for t in range(tree_roots.shape[0]):
        n = tree_roots[t]
        out[n_features] += node_value[n]
        while node_feature[n] >= 0:
            f = node_feature[n]
            child = node_left[n] if np.float64(x[f]) <= node_threshold[n] else node_right[n]
            out[f] += node_value[child] - node_value[n]
            n = child
    return out
