"""Numba kernels for the hot paths (lexical scoring, reranking features, scoring, top-k).

`kernels.features` holds the compiled kernels, `kernels.reference` their plain-numpy twins that tests
hold them to. Only numpy and numba are imported here, so the server and the trainer compute
features with exactly the same code.
"""
from kernels.features import FEATURE_NAMES, SIMILAR_FEATURE_NAMES

__all__ = ["FEATURE_NAMES", "SIMILAR_FEATURE_NAMES"]
