"""Product classification over a catalog's category tree: data, the taxonomy, the models and their bundle.

Ours: the shipped MiniLM fine-tuned with a softmax head over the taxonomy's leaf paths (class-weighted for the
long tail), blended with a TF-IDF word+char n-gram linear SVM whose scores are turned into probabilities (the
blend weight and both temperatures are fitted on a dev split). Predicting a leaf means predicting its whole path,
so every answer is a real path of the taxonomy; the probability of a shorter path is the sum of its leaves'.

Rows are split by a hash of the title (test / dev / train = 10 / 10 / 80 %), so duplicate titles never straddle
the split. The two baselines of `evaluate classify` are trained on the same training rows: the TF-IDF SVM alone,
and a zero-shot nearest-centroid classifier on the pretrained encoder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SEP = " > "
MANIFEST_KIND = "classifier"
CLASSIFIER_DIR = "classifier"  # inside a bundle: everything of the classifier lives under this folder


class ClassifyDataError(ValueError):
    """A classification CSV that cannot be used (file, row, problem)."""


# --- data ------------------------------------------------------------------------------------------

def read_catalog(path: Path) -> pd.DataFrame:
    """item_id, title, category_path (+ extras) with clean titles and paths; empty titles or paths are errors."""
    path = Path(path)
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


def normalise_path(path: str) -> str:
    return SEP.join(p.strip() for p in str(path).split(">") if p.strip())


def split_of(title: str) -> str:
    """test / dev / train by a hash of the lower-cased title (stable across runs and machines)."""
    h = int(hashlib.md5(title.lower().encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if h < 10 else "dev" if h < 20 else "train"


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- taxonomy ----------------------------------------------------------------------------------------

@dataclass
class Taxonomy:
    """The leaf paths a model predicts, and for each level the prefixes they roll up into."""

    leaves: list[str]

    def __post_init__(self) -> None:
        self.index = {p: i for i, p in enumerate(self.leaves)}
        parts = [p.split(SEP) for p in self.leaves]
        self.depth = max(len(p) for p in parts)
        self.level_names: list[list[str]] = []
        self.level_of_leaf: list[np.ndarray] = []  # per level: the leaf's prefix index, -1 where the leaf is shallower
        for lvl in range(self.depth):
            names = sorted({SEP.join(p[: lvl + 1]) for p in parts if len(p) > lvl})
            pos = {n: i for i, n in enumerate(names)}
            self.level_names.append(names)
            self.level_of_leaf.append(np.array([pos[SEP.join(p[: lvl + 1])] if len(p) > lvl else -1 for p in parts]))

    @classmethod
    def from_paths(cls, paths) -> "Taxonomy":
        return cls(sorted(set(paths)))

    def level_probs(self, leaf_probs: np.ndarray, level: int) -> np.ndarray:
        """(n, prefixes at level) probabilities: the sum of each prefix's leaves."""
        idx = self.level_of_leaf[level]
        out = np.zeros((leaf_probs.shape[0], len(self.level_names[level])), np.float64)
        keep = idx >= 0
        np.add.at(out.T, idx[keep], leaf_probs[:, keep].T)
        return out

    def prefix(self, path: str, level: int) -> str:
        return SEP.join(path.split(SEP)[: level + 1])


# --- the sparse model (also the TF-IDF SVM baseline) ---------------------------------------------------

def make_vectorizers():
    from sklearn.feature_extraction.text import TfidfVectorizer

    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=1, sublinear_tf=True, lowercase=True,
                           token_pattern=r"(?u)\b\w+\b", dtype=np.float32)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, lowercase=True,
                           dtype=np.float32)
    return word, char


class SparseModel:
    """TF-IDF word 1-2 grams + char_wb 2-5 grams -> one-vs-rest linear SVM (scikit-learn)."""

    def __init__(self, C: float = 0.5) -> None:
        self.C = C
        self.word, self.char = make_vectorizers()
        self.svm = None

    def features(self, texts: list[str]):
        from scipy.sparse import hstack

        return hstack([self.word.transform(texts), self.char.transform(texts)]).tocsr()

    def fit(self, texts: list[str], labels: np.ndarray, n_classes: int) -> "SparseModel":
        from scipy.sparse import hstack
        from sklearn.svm import LinearSVC

        x = hstack([self.word.fit_transform(texts), self.char.fit_transform(texts)]).tocsr()
        self.svm = LinearSVC(C=self.C, class_weight=None).fit(x, labels)
        self.n_classes = n_classes
        return self

    def scores(self, texts: list[str]) -> np.ndarray:
        """(n, n_classes) decision values; classes never seen in training get -inf-like scores."""
        raw = self.svm.decision_function(self.features(texts))
        if raw.ndim == 1:  # two classes
            raw = np.stack([-raw, raw], 1)
        out = np.full((len(texts), self.n_classes), -1e4, np.float32)
        out[:, self.svm.classes_] = raw
        return out

    def save(self, folder: Path) -> dict[str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        for name, vec in (("word", self.word), ("char", self.char)):
            vocab = {k: int(v) for k, v in vec.vocabulary_.items()}
            (folder / f"{name}_vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
            np.save(folder / f"{name}_idf.npy", vec.idf_.astype(np.float32))
        np.save(folder / "svm_coef.npy", self.svm.coef_.astype(np.float32))
        np.save(folder / "svm_intercept.npy", self.svm.intercept_.astype(np.float32))
        np.save(folder / "svm_classes.npy", self.svm.classes_.astype(np.int64))
        return {"C": self.C, "n_classes": self.n_classes}

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any]) -> "SparseModel":
        """Rebuild the fitted vectorizers and SVM from plain files (no pickle)."""
        from sklearn.svm import LinearSVC

        model = cls(C=float(meta["C"]))
        for name, vec in (("word", model.word), ("char", model.char)):
            vec.vocabulary_ = json.loads((folder / f"{name}_vocab.json").read_text())
            vec.idf_ = np.load(folder / f"{name}_idf.npy")
        svm = LinearSVC(C=model.C)
        svm.coef_ = np.load(folder / "svm_coef.npy")
        svm.intercept_ = np.load(folder / "svm_intercept.npy")
        svm.classes_ = np.load(folder / "svm_classes.npy")
        model.svm, model.n_classes = svm, int(meta["n_classes"])
        return model


# --- probabilities, calibration, metrics ------------------------------------------------------------------

def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood on (logits, y) (grid, then refine)."""
    grid = np.exp(np.linspace(math.log(0.02), math.log(20.0), 61))
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


def autofill_threshold(conf: np.ndarray, correct: np.ndarray, precision: float = 0.95) -> float:
    """The lowest confidence at which predictions at or above it are right at least `precision` of the time."""
    order = np.argsort(-conf)
    hits = np.cumsum(correct[order])
    prec = hits / np.arange(1, len(order) + 1)
    ok = np.nonzero(prec >= precision)[0]
    if not len(ok):
        return 1.0
    # The largest prefix of confident predictions that keeps the precision (monotone from the top).
    return float(conf[order][ok[-1]])


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
