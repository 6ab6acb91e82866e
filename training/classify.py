"""Training-side helpers of product classification: the data, the split, calibration and the metrics.

The model itself (taxonomy, TF-IDF SVM, fine-tuned network, their blend) lives in `common.classifier`, which
the server loads too; it is re-exported here for the training code.

Rows are split by a hash of the title (test / dev / train = 10 / 10 / 80 %), so duplicate titles never straddle
the split. The two baselines of `evaluate classify` are trained on the same training rows: the TF-IDF SVM alone,
and a zero-shot nearest-centroid classifier on the pretrained encoder.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd

from common.classifier import (CLASSIFIER_DIR, SEP, SparseModel, Taxonomy, item_text,  # noqa: F401 (re-exported)
                               normalise_path, softmax)

log = logging.getLogger(__name__)

AUTOFILL_FLOOR = 0.5  # auto-fill never trusts a top probability below this, whatever dev says


class ClassifyDataError(ValueError):
    """A classification CSV that cannot be used (file, row, problem)."""


# --- data ------------------------------------------------------------------------------------------

def read_catalog(path: Path) -> pd.DataFrame:
    """item_id, title, category_path (+ extras) with clean titles and paths; empty titles or paths are errors.

    Also reads a search catalog of the project's format (.jsonl, or a CSV with a `category` column and no
    `category_path`): its items with a category become the rows (title, brand, category as the path); items
    without one are left out, since they are what the classifier will fill in."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl" or _is_search_catalog_csv(path):
        return _search_catalog_rows(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ClassifyDataError(f"{path}: cannot read it as CSV: {exc}") from exc
    missing = {"item_id", "title", "category_path"} - set(df.columns)
    if missing:
        raise ClassifyDataError(f"{path}: missing column(s) {sorted(missing)}; expected item_id,title,category_path")
    df["title"] = df["title"].str.strip()
    df["category_path"] = df["category_path"].map(normalise_path)
    for col in ("title", "category_path"):
        bad = df.index[df[col] == ""]
        if len(bad):
            raise ClassifyDataError(f"{path}: row {int(bad[0]) + 2}: empty {col}")
    return df.reset_index(drop=True)


def _is_search_catalog_csv(path: Path) -> bool:
    try:
        header = pd.read_csv(path, dtype=str, nrows=0).columns
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return False  # read_catalog reports the problem
    return "category" in header and "category_path" not in header


def _search_catalog_rows(path: Path) -> pd.DataFrame:
    from training.catalog import CatalogError, load_catalog

    try:
        items = load_catalog(path)
    except CatalogError as exc:
        raise ClassifyDataError(str(exc)) from exc
    items = items[items["category"].map(normalise_path) != ""]
    if items.empty:
        raise ClassifyDataError(f"{path}: no item has a category to learn from")
    return pd.DataFrame({"item_id": items["item_id"], "title": items["title"],
                         "category_path": items["category"].map(normalise_path), "brand": items["brand"]}
                        ).reset_index(drop=True)


def texts_of(df: pd.DataFrame) -> list[str]:
    brands = df["brand"] if "brand" in df.columns else [""] * len(df)
    return [item_text(t, b) for t, b in zip(df["title"], brands)]


def split_of(title: str) -> str:
    """test / dev / train by a hash of the lower-cased title (stable across runs and machines)."""
    h = int(hashlib.md5(title.lower().encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if h < 10 else "dev" if h < 20 else "train"


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- probabilities, calibration, metrics ------------------------------------------------------------------

def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood on (logits, y) (grid, then refine).

    When every row is right the likelihood has no minimum (it keeps falling as the temperature goes to zero,
    and every probability to 1.0: what a small catalog's dev split does). Then the temperature is the sharpest
    one whose mean top probability stays at or below the Laplace-smoothed accuracy, (n + 1) / (n + 2): never
    more sure, on average, than those rows can show."""
    grid = np.exp(np.linspace(math.log(0.02), math.log(20.0), 61))
    if len(y) and np.all(logits.argmax(1) == y):
        limit = (len(y) + 1) / (len(y) + 2)
        ok = [t for t in grid if softmax(logits / t).max(1).mean() <= limit]
        return float(min(ok)) if ok else float(grid[-1])
    best = min(grid, key=lambda t: nll(softmax(logits / t), y))
    fine = best * np.exp(np.linspace(-0.12, 0.12, 13))
    return float(min(fine, key=lambda t: nll(softmax(logits / t), y)))


def ece(probs: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top probability (equal-width bins)."""
    conf = probs.max(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def wilson_lower(hits: np.ndarray, n: np.ndarray, z: float = 1.645) -> np.ndarray:
    """One-sided 95% Wilson lower bound of a proportion hits/n (elementwise)."""
    p = hits / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def autofill_threshold(conf: np.ndarray, correct: np.ndarray, precision: float = 0.95,
                       floor: float | None = None) -> float:
    """The lowest confidence at which the predictions at or above it are right at least `precision` of the time,
    with 95% confidence (the Wilson lower bound of their dev precision, not the observed precision: a dev split
    of a few hundred rows would otherwise pick a threshold that misses the target on new rows), and never below
    `floor` (a calibrated top probability under 0.5 says the model more likely errs than not)."""
    floor = AUTOFILL_FLOOR if floor is None else floor
    order = np.argsort(-conf)
    n = np.arange(1, len(order) + 1, dtype=np.float64)
    lower = wilson_lower(np.cumsum(correct[order]).astype(np.float64), n)
    ranked = conf[order]
    # Only the last of a run of equal confidences is a threshold one can apply (the run is filled as a whole).
    ends = np.append(ranked[1:] < ranked[:-1], True)
    ok = np.nonzero((lower >= precision) & ends)[0]
    if not len(ok):
        return 1.0
    # The largest prefix of confident predictions that keeps the bound (monotone from the top).
    return float(max(ranked[ok[-1]], floor))


def scores(tax: Taxonomy, true_paths: list[str], pred_leaf: np.ndarray) -> dict[str, float]:
    """leaf accuracy, macro-F1 over leaf paths, first-level accuracy, rows."""
    from sklearn.metrics import f1_score

    pred = [tax.leaves[i] for i in pred_leaf]
    leaf_acc = float(np.mean([p == t for p, t in zip(pred, true_paths)]))
    top = float(np.mean([tax.prefix(p, 0) == tax.prefix(t, 0) for p, t in zip(pred, true_paths)]))
    macro = float(f1_score(true_paths, pred, average="macro", zero_division=0))
    return {"leaf_accuracy": leaf_acc, "macro_f1": macro, "top_accuracy": top, "rows": len(true_paths)}


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
