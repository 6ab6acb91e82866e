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

from common.classifier import MAX_LENGTH, ClassifierParts
from common.encoding import TextEncoder

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
    """A bundle's classifier loaded for serving: its network's encoder runs as the search encoder does
    (`TextEncoder`: TorchScript-traced on CPU, bf16 weights on a CPU with native bf16, the graph cache),
    the head, the TF-IDF SVM and the blend in numpy."""

    def __init__(self, parts: ClassifierParts, encoder: TextEncoder | None, threshold: float) -> None:
        self.parts = parts
        self.encoder = encoder
        self.threshold = threshold

    @classmethod
    def load(cls, bundle_path: Path, files: dict[str, str], device: str, dtype: str, threshold: float | None,
             trace: bool = True, graph_cache: Path | None = None) -> "ServedClassifier":
        """files: the bundle manifest's checksums (verified by the loader: they key the graph cache).
        threshold: the server's override of the bundle's auto-fill threshold (None = the bundle's)."""
        started = time.perf_counter()
        parts = ClassifierParts.load(bundle_path)
        prefix = f"{parts.meta.get('path', 'classifier')}/encoder/"
        digests = {n: files[prefix + n] for n in ("config.json", "model.safetensors") if prefix + n in files}
        # int8 is the search encoder's quantization, not measured on this network: it stays fp32 there.
        encoder = TextEncoder(parts.root / "encoder", device=device, dtype="float32" if dtype == "int8" else dtype,
                              max_length=MAX_LENGTH, pooling="mean", normalize=False, trace=trace,
                              graph_cache=graph_cache, digests=digests if len(digests) == 2 else None)
        bundle_threshold = float(parts.meta["autofill_threshold"])
        served = cls(parts, encoder, bundle_threshold if threshold is None else threshold)
        log.info("classifier: %d categories, depth %d, network %s, auto-fill threshold %.3f%s, loaded in %.2fs",
                 len(parts.tax.leaves), parts.tax.depth, encoder.dtype, served.threshold,
                 "" if threshold is None else f" (override; the bundle's is {bundle_threshold:.3f})",
                 time.perf_counter() - started)
        return served

    @property
    def categories(self) -> int:
        return len(self.parts.tax.leaves)

    @property
    def autofills(self) -> bool:
        """False when no probability can reach the threshold (1.0: the dev split could not show the precision)."""
        return self.threshold < 1.0

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), categories) leaf probabilities."""
        pooled = self.encoder.encode(texts, batch_size=max(1, min(len(texts), 64)))
        return self.parts.probabilities(texts, pooled).astype(np.float32)

    def top(self, probs: np.ndarray, k: int) -> Classification:
        k = min(k, len(probs))
        best = np.argpartition(-probs, k - 1)[:k]
        best = best[np.argsort(-probs[best], kind="stable")]
        tax = self.parts.tax
        preds = tuple(Prediction(tax.leaves[i], float(probs[i]), tuple(tax.path_levels(int(i), probs))) for i in best)
        return Classification(preds, self.fills(preds[0].probability))

    def fills(self, probability: float) -> bool:
        return self.autofills and probability >= self.threshold

    def warmup(self) -> None:
        self.probabilities(list(WARMUP_TEXTS))

