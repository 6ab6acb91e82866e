"""The product classifier as a bundle holds it and as both sides use it: load it and predict.

`training` fits it (training/classify.py, training/classifier_build.py) and the server serves it; this module
is what they share, so an item is read, scored and turned into probabilities by one piece of code.

The model: the shipped MiniLM fine-tuned with a softmax head over the taxonomy's leaf paths, blended with a
TF-IDF word+char n-gram linear SVM (log-probabilities weighted, each model's temperature and the blend's
final temperature fitted on a dev split). Predicting a leaf predicts its whole path, so every answer is a
real path of the taxonomy; the probability of a shorter path is the sum of its leaves' (`Taxonomy.level_probs`).

On disk (under `classifier/` of a bundle): `encoder/` (safetensors + tokenizer), `head.safetensors`,
`taxonomy.json`, `sparse/` (vocabularies and idf as json/npy, SVM coefficients as npy). No pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.text import SEP, normalise_path  # noqa: F401 (part of this module's interface)

CLASSIFIER_DIR = "classifier"  # inside a bundle: everything of the classifier lives under this folder
MAX_LENGTH = 40  # tokens of an item's text the network reads (titles are short; 40 covers 99% of them)


def item_text(title: str, brand: str = "") -> str:
    """What the classifier reads for an item: its title, led by its brand when the title does not name it.
    Training (a CSV with an optional `brand` column, or a search catalog) and serving use this one function."""
    title, brand = title.strip(), brand.strip()
    return f"{brand} {title}" if brand and brand.lower() not in title.lower() else title


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


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

    def path_levels(self, leaf: int, leaf_probs: np.ndarray) -> list[tuple[str, float]]:
        """Each prefix of leaf's path with its probability (the sum of its leaves) under one row of leaf_probs."""
        out = []
        for lvl in range(self.leaves[leaf].count(SEP) + 1):
            idx = self.level_of_leaf[lvl]
            out.append((self.level_names[lvl][idx[leaf]], float(leaf_probs[idx == idx[leaf]].sum())))
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

    def save(self, folder: Path) -> dict[str, Any]:
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
            vec.idf_ = np.load(folder / f"{name}_idf.npy", allow_pickle=False)
        svm = LinearSVC(C=model.C)
        svm.coef_ = np.load(folder / "svm_coef.npy", allow_pickle=False)
        svm.intercept_ = np.load(folder / "svm_intercept.npy", allow_pickle=False)
        svm.classes_ = np.load(folder / "svm_classes.npy", allow_pickle=False)
        model.svm, model.n_classes = svm, int(meta["n_classes"])
        return model


# --- the network ---------------------------------------------------------------------------------------

class DenseClassifier(torch.nn.Module):
    """MiniLM (mean pooling) -> dropout -> linear head over the leaf paths."""

    def __init__(self, encoder, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)
        return self.head(self.dropout(pooled))


def token_batches(tok, texts: list[str], batch: int, order: np.ndarray):
    for i in range(0, len(order), batch):
        idx = order[i: i + batch]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        yield idx, enc


def logits_of(model: DenseClassifier, tok, texts: list[str], bf16: bool, batch: int = 128,
              device: str = "cpu") -> np.ndarray:
    """(n, classes) logits, in length-sorted batches (less padding), returned in the input order.
    bf16 on CPU autocasts to bfloat16; on CUDA the network runs in float16 (see `Classifier.load`)."""
    model.eval()
    out = np.zeros((len(texts), model.head.out_features), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device == "cpu"):
        for idx, enc in token_batches(tok, texts, batch, order):
            logits = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out[idx] = logits.float().cpu().numpy()
    return out


class Classifier:
    """A trained classifier (fresh from training or loaded from a bundle): leaf probabilities for texts."""

    def __init__(self, tax: Taxonomy, sparse: SparseModel, dense: DenseClassifier, tok, blend: dict, bf16: bool,
                 device: str = "cpu", meta: dict | None = None) -> None:
        self.tax, self.sparse, self.dense, self.tok, self.blend, self.bf16 = tax, sparse, dense, tok, blend, bf16
        self.device = device
        self.meta = meta or {}

    def combined_logits(self, sparse_scores: np.ndarray, dense_logits: np.ndarray) -> np.ndarray:
        return blend_logits(self.blend, sparse_scores, dense_logits)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(n, leaves) calibrated probabilities of each leaf path."""
        dense = logits_of(self.dense, self.tok, texts, self.bf16, device=self.device)
        z = self.combined_logits(self.sparse.scores(texts), dense)
        return softmax(z / self.blend["temperature"])

    @classmethod
    def load(cls, bundle: Path, bf16: bool | None = None, device: str = "cpu") -> "Classifier":
        """The classifier part of a bundle (the caller has verified the bundle's checksums)."""
        from transformers import AutoModel, AutoTokenizer

        parts = ClassifierParts.load(bundle)
        tok = AutoTokenizer.from_pretrained(parts.root / "encoder")
        dense = DenseClassifier(AutoModel.from_pretrained(parts.root / "encoder", use_safetensors=True),
                                len(parts.tax.leaves))
        dense.head.load_state_dict({"weight": torch.from_numpy(parts.head_weight),
                                    "bias": torch.from_numpy(parts.head_bias)})
        dense.eval()
        if device.startswith("cuda"):
            dense = dense.to(device).half()
        use_bf16 = parts.meta.get("bf16", False) if bf16 is None else bf16
        return cls(parts.tax, parts.sparse, dense, tok, parts.meta["blend"], use_bf16, device, parts.meta)


def blend_logits(blend: dict, sparse_scores: np.ndarray, dense_logits: np.ndarray) -> np.ndarray:
    """The blend of the two models' log-probabilities (before the final temperature)."""
    log_s = np.log(np.clip(softmax(sparse_scores / blend["svm_temperature"]), 1e-12, 1))
    log_d = np.log(np.clip(softmax(dense_logits / blend["dense_temperature"]), 1e-12, 1))
    return blend["dense_weight"] * log_d + (1 - blend["dense_weight"]) * log_s


@dataclass
class ClassifierParts:
    """Everything of a bundle's classifier but the network's encoder: what a caller with its own way of
    running the encoder (the server's TextEncoder: traced, bf16 weights, graph cache) needs beside it.
    The network's logits are mean_pool(encoder(text)) @ head_weight.T + head_bias."""

    meta: dict[str, Any]
    root: Path  # the classifier folder; its encoder is root / "encoder"
    tax: Taxonomy
    sparse: SparseModel
    head_weight: np.ndarray  # float32 (leaves, hidden)
    head_bias: np.ndarray  # float32 (leaves,)

    @classmethod
    def load(cls, bundle: Path) -> "ClassifierParts":
        from safetensors.numpy import load_file

        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        meta = manifest.get("classifier")
        if meta is None:
            raise FileNotFoundError(f"{bundle}: the bundle has no classifier (manifest has no 'classifier' part)")
        root = Path(bundle) / meta.get("path", CLASSIFIER_DIR)
        tax = Taxonomy(json.loads((root / "taxonomy.json").read_text())["leaves"])
        head = load_file(root / "head.safetensors")
        sparse = SparseModel.load(root / "sparse", meta["sparse"])
        return cls(meta, root, tax, sparse, head["weight"].astype(np.float32), head["bias"].astype(np.float32))

    def probabilities(self, texts: list[str], pooled: np.ndarray) -> np.ndarray:
        """(n, leaves) calibrated probabilities from the texts and their mean-pooled encoder states."""
        dense = pooled.astype(np.float32) @ self.head_weight.T + self.head_bias
        z = blend_logits(self.meta["blend"], self.sparse.scores(texts), dense)
        return softmax(z / self.meta["blend"]["temperature"])
