"""Bundle verification: a damaged bundle is refused with a message that says what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from common import bundle_format as bf
from server.bundle import BundleError, load_bundle


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(root: Path, mutate=None, rechecksum=True) -> None:
    manifest = json.loads((root / bf.MANIFEST).read_text())
    if mutate:
        mutate(manifest)
    if rechecksum:
        manifest["files"] = bf.checksum_tree(root)
    (root / bf.MANIFEST).write_text(json.dumps(manifest))


def test_sample_bundle_loads(sample_bundle):
    b = load_bundle(sample_bundle)
    assert len(b.items) == 324 and b.vectors.shape == (324, 384)
    np.testing.assert_allclose(np.linalg.norm(b.vectors, axis=1), 1.0, atol=1e-2)
    assert b.index.ntotal == 324 and b.index_type == "flat_ip"
    assert b.scan_index is not None and b.scan_index.ntotal == 324  # the fp16 copy small batches scan
    assert b.lexical.speller is not None and b.lexical.speller.correct("cordles") == "cordless"


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_missing_manifest(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    (root / bf.MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(root)


def test_missing_file(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    (root / bf.POPULARITY_FILE).unlink()
    with pytest.raises(BundleError, match=f"file {bf.POPULARITY_FILE} is missing"):
        load_bundle(root)


def test_wrong_checksum(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    data = bytearray((root / bf.VECTORS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (root / bf.VECTORS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"checksum mismatch for {bf.VECTORS_FILE}"):
        load_bundle(root)


def test_truncated_index_is_refused_even_with_matching_checksums(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    path = root / bf.INDEX_FILE
    path.write_bytes(path.read_bytes()[:1000])
    rewrite_manifest(root)
    with pytest.raises(BundleError, match="cannot read bundle|FAISS"):
        load_bundle(root)


def test_wrong_vector_dimensions(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    np.save(root / bf.VECTORS_FILE, np.zeros((324, 128), np.float16))
    index = faiss.IndexFlatIP(128)
    index.add(np.zeros((324, 128), np.float32))
    faiss.write_index(index, str(root / bf.INDEX_FILE))
    rewrite_manifest(root)
    with pytest.raises(BundleError, match=r"shape \(324, 128\), expected \(324, 384\)"):
        load_bundle(root)


def test_newer_schema_version(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m.update(schema_version=bf.SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this server supports"):
        load_bundle(root)


def test_reranker_with_other_feature_schema(sample_bundle, tmp_path):
    root = clone(sample_bundle, tmp_path / "b")
    spec = json.loads((root / bf.RERANKER_FILE).read_text())
    spec["features"] = spec["features"][::-1]
    (root / bf.RERANKER_FILE).write_text(json.dumps(spec))
    rewrite_manifest(root)
    with pytest.raises(BundleError, match="differ from this server's schema"):
        load_bundle(root)


def test_bundle_files_are_never_pickles(sample_bundle):
    for path in sample_bundle.rglob("*.npy"):
        np.load(path, allow_pickle=False)
    lex = np.load(sample_bundle / bf.LEXICAL_FILE, allow_pickle=False)
    assert set(lex.files) >= {"bm25_indptr", "bm25_indices", "bm25_data", "title_indptr", "title_tokens"}
