"""The artifact bundle's on-disk format: schema version, file names, manifest and checksums.

A bundle is a directory written by `training` and read by `server`. Everything in it is safetensors,
npy/npz, parquet or json (no pickle); `manifest.json` describes it and holds the sha256 of every
other file, so a reader can refuse a damaged bundle before serving it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

ENCODER_DIR = "encoder"
ITEMS_FILE = "items.parquet"
VECTORS_FILE = "item_vectors.npy"
INDEX_FILE = "dense.faiss"
LEXICAL_FILE = "lexical.npz"
VOCAB_FILE = "lexical_vocab.json"
RERANKER_FILE = "reranker.json"
POPULARITY_FILE = "popularity.npy"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksum_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by posix relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse root/manifest.json; raises FileNotFoundError or ValueError with the path in the message."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.json (is this a searchrec bundle?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return manifest


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The recommender part of a bundle (optional: bundles built without behaviour data have none).
REC_MODEL_FILE = "recommender.safetensors"  # SeqEncoder weights (+ text_proj.weight when items have text)
REC_VECTORS_FILE = "rec_item_vectors.npy"  # float32 [items, d], row-aligned with the item table
REC_USERS_FILE = "rec_users.parquet"  # user_id per history row
REC_HISTORY_FILE = "rec_history.npz"  # indptr, items (item rows, oldest first), types
REC_STATS_FILE = "rec_stats.npz"  # popularity, co_indptr, co_indices, co_weights
