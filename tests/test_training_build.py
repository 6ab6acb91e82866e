"""The minimal bundle builder: catalog validation, clear errors, atomic output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.__main__ import main as training_main
from training.catalog import CatalogError, load_catalog
from tests.conftest import SAMPLE


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_sample_catalog_loads():
    df = load_catalog(SAMPLE / "catalog.jsonl")
    assert len(df) == 324 and df["item_id"].is_unique
    assert set(df["category"]) >= {"Power Tools", "Kitchen", "Garden", "Lighting", "Furniture"}
    assert df["price"].notna().all() and (df["price"] > 0).all()


def test_csv_catalog_with_missing_optional_fields(tmp_path):
    path = write(tmp_path / "c.csv", "item_id,title,price,in_stock\nA1,  Cordless   Drill ,19.5,\nA2,Hammer,,no\n")
    df = load_catalog(path)
    assert df["title"].tolist() == ["Cordless Drill", "Hammer"]
    assert df["in_stock"].tolist() == [True, False]
    assert df["price"].isna().tolist() == [False, True]


@pytest.mark.parametrize("content,needle", [
    ('{"item_id": "A", "title": "x"}\n{"item_id": "A", "title": "y"}\n', ":2: duplicate item_id 'A' (first at row 1)"),
    ('{"item_id": "A", "title": "  "}\n', ":1: field 'title' is empty"),
    ('{"item_id": "", "title": "x"}\n', ":1: field 'item_id' is empty"),
    ('{"item_id": "A", "title": "x", "price": -3}\n', ":1: field 'price' must be a finite number >= 0"),
    ('{"item_id": "A", "title": "x", "price": "cheap"}\n', ":1: field 'price' must be a number"),
    ('{"item_id": "A", "title": "x"}\n{not json\n', ":2: not valid JSON"),
    ('{"item_id": "A", "title": "x\\u0000y"}\n', ":1: field 'title' contains control characters"),
    ('{"item_id": "A", "title": "x", "in_stock": "maybe"}\n', "'in_stock' must be true/false"),
])
def test_malformed_rows_name_file_row_and_problem(tmp_path, content, needle):
    path = write(tmp_path / "c.jsonl", content)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_wrong_encoding_is_a_clear_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes('{"item_id": "A", "title": "Caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(CatalogError, match="not UTF-8"):
        load_catalog(path)


def test_cli_refuses_existing_output_and_bad_catalog(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = write(tmp_path / "bad.jsonl", '{"item_id": "A"}\n')
    assert training_main(["build", "--catalog", str(bad), "--out", str(tmp_path / "new")]) == 2
    assert "field 'title' is empty" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert training_main(["build", "--catalog", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "n")]) == 2


def test_failed_build_leaves_no_half_bundle(tmp_path, monkeypatch):
    import training.bundle_writer as bw

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bw, "build_lexical", boom)
    catalog = write(tmp_path / "c.jsonl", '{"item_id": "A", "title": "Cordless drill"}\n')
    with pytest.raises(RuntimeError, match="disk full"):
        training_main(["build", "--catalog", str(catalog), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_manifest_describes_the_bundle(sample_bundle):
    manifest = json.loads((sample_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["encoder"] == {**manifest["encoder"], "dims": 384, "pooling": "mean", "normalize": True}
    assert manifest["index"]["type"] == "flat_ip" and manifest["items"]["count"] == 324
    assert manifest["data_fingerprints"]["catalog"].startswith("sha256:")
    assert "encoder/model.safetensors" in manifest["files"]
    assert set(manifest["timings"]) >= {"encode_s", "index_s", "lexical_s"}


def test_large_catalogs_get_ivf_pq_with_measured_recall():
    import faiss
    import numpy as np

    from training.bundle_writer import ann_recall, build_index

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index, params = build_index(vecs, flat_max_items=1000)
    assert params["type"] == "ivf_pq_refine" and params["recall@100_vs_exact"] >= 0.98
    assert params["recall_measured_on"].endswith("perturbed item vectors (no real queries given)")
    assert faiss.extract_index_ivf(index).nprobe == params["nprobe"] and index.k_factor == params["k_factor"]
    # The pick is the fastest pair of the grid that reached the target.
    good = [t for t in params["tried"] if t["recall"] >= 0.98 + params["margin"]]
    best = min(good, key=lambda t: t["ms_per_query"])
    assert (best["nprobe"], best["k_factor"]) == (params["nprobe"], params["k_factor"])
    # The recorded recall is what the index really does on fresh queries.
    q = vecs[rng.choice(3000, 100)] + rng.normal(0, 0.05, (100, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert ann_recall(index, vecs, q) >= 0.95
    small, p_small = build_index(vecs[:500], flat_max_items=1000)
    assert p_small["type"] == "flat_ip" and small.ntotal == 500
    _, p_real = build_index(vecs, flat_max_items=1000, queries=q)
    assert p_real["recall_measured_on"] == "100 real query vectors"
