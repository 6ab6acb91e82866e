"""The bundle's product classifier as served: a batch function, top-k paths, and the auto-fill decision.

`ServedClassifier.probabilities` is the classify batcher's batch function (one TF-IDF pass and one network
forward pass per batch); `top` turns one row of leaf probabilities into the k most probable category paths,
each with the probability of every level of its path. `fills` says whether a top probability is high enough
to write the category into an item that has none (the bundle's threshold, or the server's override).
Nothing here knows about gRPC.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.classifier import Classifier

log = logging.getLogger(__name__)
WARMUP_TEXTS = ("cordless drill", "Stainless steel kitchen sink with drain", "Kids building blocks set 100 pieces")


@dataclass(frozen=True)
class Prediction:
    """One category path with its probability and the probability of each level of the path (first level
    first; the last is the path itself)."""

    path: str
    probability: float
    levels: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Classification:
    predictions: tuple[Prediction, ...]  # most probable first
    confident: bool  # the top probability reaches the auto-fill threshold


class ServedClassifier:
    """A bundle's classifier loaded for serving."""

    def __init__(self, clf: Classifier, threshold: float) -> None:
        self.clf = clf
        self.threshold = threshold

    @classmethod
    def load(cls, bundle_path: Path, device: str, dtype: str, threshold: float | None) -> "ServedClassifier":
        """threshold: the server's override of the bundle's auto-fill threshold (None = the bundle's)."""
        started = time.perf_counter()
        # The network runs in bf16 where the encoder does (a bf16 CPU); int8 is the search encoder's own
        # quantization and leaves this network in fp32.
        clf = Classifier.load(bundle_path, bf16=device == "cpu" and dtype == "bfloat16", device=device)
        bundle_threshold = float(clf.meta["autofill_threshold"])
        served = cls(clf, bundle_threshold if threshold is None else threshold)
        log.info("classifier: %d categories, depth %d, auto-fill threshold %.3f%s, loaded in %.2fs",
                 len(clf.tax.leaves), clf.tax.depth, served.threshold,
                 "" if threshold is None else f" (override; the bundle's is {bundle_threshold:.3f})",
                 time.perf_counter() - started)
        return served

    @property
    def categories(self) -> int:
        return len(self.clf.tax.leaves)

    @property
    def autofills(self) -> bool:
        """False when no probability can reach the threshold (1.0: the dev split could not show the precision)."""
        return self.threshold < 1.0

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), categories) leaf probabilities."""
        return self.clf.predict_proba(texts).astype(np.float32)

    def top(self, probs: np.ndarray, k: int) -> Classification:
        k = min(k, len(probs))
        best = np.argpartition(-probs, k - 1)[:k]
        best = best[np.argsort(-probs[best], kind="stable")]
        tax = self.clf.tax
        preds = tuple(Prediction(tax.leaves[i], float(probs[i]), tuple(tax.path_levels(int(i), probs))) for i in best)
        return Classification(preds, self.fills(preds[0].probability))

    def fills(self, probability: float) -> bool:
        return self.autofills and probability >= self.threshold

    def warmup(self) -> None:
        self.probabilities(list(WARMUP_TEXTS))

