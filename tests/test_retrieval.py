"""Retrieval pieces: filtered dense search paths agree with exact search; the tokenizer; device policy."""
from __future__ import annotations

from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from common.encoding import DeviceError, resolve_device, resolve_dtype
from common.text import has_control_chars, tokenize
from server.bundle import FP16_SCAN_BATCH_MAX, add_to_small_batch_index, small_batch_index
from server.retrieval import DenseRetriever, _exact_top


def fake_bundle(n=2000, d=16, hnsw=False, seed=0, scan=False, ivf=False):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs.astype(np.float16).astype(np.float32)  # as bundles store them
    if ivf:  # what the builder makes above its exact-search limit, read back as the server reads it
        from training.bundle_writer import build_index

        built, params = build_index(vecs, flat_max_items=n - 1)
        faiss.write_index(built, str(ivf / "dense.faiss"))
        index, itype, manifest = faiss.read_index(str(ivf / "dense.faiss")), params["type"], {"index": params}
    elif hnsw:
        index = faiss.IndexHNSWFlat(d, 16, faiss.METRIC_INNER_PRODUCT)
        itype, manifest = "hnsw_ip", {"index": {"efSearch": 64}}
        index.add(vecs)
    else:
        index = faiss.IndexFlatIP(d)
        itype, manifest = "flat_ip", {"index": {}}
        index.add(vecs)
    scan_index, scan_batch_max = small_batch_index(index, vecs) if scan else (None, 0)
    return SimpleNamespace(vectors=vecs, index=index, index_type=itype, manifest=manifest, scan_index=scan_index,
                           scan_batch_max=scan_batch_max)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_selector_search_agrees_with_exact_subset(kind, tmp_path):
    b = fake_bundle(hnsw=kind == "hnsw", ivf=tmp_path if kind == "ivf" else False)
    hnsw = kind != "flat"
    rng = np.random.default_rng(1)
    mask = rng.random(len(b.vectors)) < 0.3
    q = b.vectors[5] + 0.1
    q /= np.linalg.norm(q)
    exact = _exact_top(b.vectors, np.flatnonzero(mask), q, 20)
    via_selector = DenseRetriever(b, "cpu", exact_filter_max=0).search_filtered(q, 20, mask)
    assert mask[via_selector].all() and len(via_selector) == 20
    overlap = len(set(exact) & set(via_selector)) / 20
    assert overlap == 1.0 if not hnsw else overlap >= 0.9


def test_very_selective_filter_returns_every_match():
    b = fake_bundle(hnsw=True)
    mask = np.zeros(len(b.vectors), bool)
    mask[[3, 700, 1500]] = True
    for exact_max in (0, 10_000):  # through the selector (with exact fallback) and exactly
        rows = DenseRetriever(b, "cpu", exact_filter_max=exact_max).search_filtered(b.vectors[0], 10, mask)
        assert sorted(rows.tolist()) == [3, 700, 1500]


def test_batched_unfiltered_search_matches_single_queries():
    b = fake_bundle()
    r = DenseRetriever(b, "cpu", exact_filter_max=100)
    qs = b.vectors[:8]
    batched = r.search(qs, [5] * 8, [None] * 8)
    for i in range(8):
        single = r.search(qs[i : i + 1], [5], [None])[0]
        np.testing.assert_array_equal(batched[i], single)
        assert batched[i][0] == i  # a vector's nearest neighbour is itself


def test_small_batches_scan_the_fp16_copy_and_find_the_same_items(monkeypatch):
    b = fake_bundle(scan=True)
    r = DenseRetriever(b, "cpu", exact_filter_max=100)
    rng = np.random.default_rng(3)
    assert r.scan_batch_max == FP16_SCAN_BATCH_MAX  # 2,000 items: the fp16 copy
    qs = rng.normal(size=(FP16_SCAN_BATCH_MAX + 1, 16)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    used = []
    for name in ("index", "scan_index"):
        real = getattr(r, name)
        monkeypatch.setattr(r, name, SimpleNamespace(search=lambda q, n, real=real, name=name: (used.append(name), real.search(q, n))[1]))
    big = r.search(qs, [50] * len(qs), [None] * len(qs))  # one more than the scan limit: BLAS over fp32
    small = [r.search(qs[i : i + 1], [50], [None])[0] for i in range(len(qs))]
    assert used == ["index"] + ["scan_index"] * len(qs)
    for i in range(len(qs)):
        np.testing.assert_array_equal(np.sort(big[i]), np.sort(small[i]))


def test_large_exact_bundles_answer_small_batches_by_fast_scan_with_exact_rescoring(monkeypatch):
    from server.bundle import FAST_SCAN_BATCH_MAX, FAST_SCAN_MIN_ITEMS

    b = fake_bundle(n=FAST_SCAN_MIN_ITEMS + 500, d=32, scan=True)
    assert isinstance(b.scan_index, faiss.IndexRefine) and b.scan_batch_max == FAST_SCAN_BATCH_MAX
    r = DenseRetriever(b, "cpu", exact_filter_max=100)
    rng = np.random.default_rng(4)
    qs = b.vectors[rng.choice(len(b.vectors), 40, replace=False)] + rng.normal(scale=0.15, size=(40, 32)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    exact = [_exact_top(b.vectors, np.arange(len(b.vectors)), q, 50) for q in qs]
    used = []
    for name in ("index", "scan_index"):
        real = getattr(r, name)
        monkeypatch.setattr(r, name, SimpleNamespace(search=lambda q, n, real=real, name=name: (used.append(name), real.search(q, n))[1]))
    small = r.search(qs[:FAST_SCAN_BATCH_MAX], [50] * FAST_SCAN_BATCH_MAX, [None] * FAST_SCAN_BATCH_MAX)
    big = r.search(qs, [50] * len(qs), [None] * len(qs))
    assert used == ["scan_index", "index"]
    found = sum(len(set(a) & set(e)) for a, e in zip(small, exact))
    assert found >= 0.99 * 50 * len(small)  # codes only pick candidates; the order is exact scores
    for a, e in zip(small, exact):
        np.testing.assert_array_equal(a[:10], e[:10])
    for a, e in zip(big, exact):
        assert set(a) == set(e)
    # Live items: appended to the flat index by the caller, to the codes here; found at once.
    monkeypatch.undo()
    new = rng.normal(size=(3, 32)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    b.index.add(new)
    add_to_small_batch_index(b.scan_index, new)
    assert b.scan_index.ntotal == b.index.ntotal == FAST_SCAN_MIN_ITEMS + 503
    rows = r.search(new, [5] * 3, [None] * 3)
    assert [int(x[0]) for x in rows] == [FAST_SCAN_MIN_ITEMS + 500 + i for i in range(3)]


def test_tokenizer_stems_drops_stopwords_and_keeps_numbers():
    assert tokenize("The Cordless Drills for 1.5 in. pipes") == ["cordless", "drill", "1.5", "pipe"]
    assert tokenize("") == [] and tokenize("the of and") == []
    assert tokenize("ＤｅＷａｌｔ") == tokenize("dewalt")  # NFKC folds full-width letters


def test_control_characters():
    assert has_control_chars("a\x00b") and has_control_chars("\x1b[0m")
    assert not has_control_chars("tab\tand newline\n ok é ✓")


def test_device_policy_by_cpu_kind(cpu_kind):
    # auto: bf16 where the CPU has native bf16, fp32 where bf16 would be emulated; explicit asks win.
    assert resolve_dtype("cpu", "auto") == cpu_kind
    assert resolve_dtype("cpu", "float32") == "float32" and resolve_dtype("cpu", "bfloat16") == "bfloat16"
    assert resolve_dtype("cuda", "auto") == "float16"


def test_a_malformed_cpu_override_is_a_device_error(monkeypatch):
    monkeypatch.setenv("SEARCHREC_CPU_BF16", "sometimes")
    with pytest.raises(DeviceError, match="SEARCHREC_CPU_BF16 must be 1 or 0"):
        resolve_dtype("cpu", "auto")
    assert resolve_dtype("cpu", "float32") == "float32"  # an explicit precision does not ask


def test_device_policy():
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("cpu", "float32") == "float32"
    assert resolve_dtype("cuda", "auto") == "float16"
    with pytest.raises(DeviceError):
        resolve_dtype("cpu", "float16")
    assert resolve_dtype("cpu", "int8") == "int8"
    with pytest.raises(DeviceError, match="int8"):
        resolve_dtype("cuda", "int8")
    with pytest.raises(DeviceError):
        resolve_device("tpu")


def test_ivf_bundle_gets_its_measured_settings_back(tmp_path):
    b = fake_bundle(ivf=tmp_path)
    assert b.index_type == "ivf_pq_refine"
    b.index.k_factor, faiss.extract_index_ivf(b.index).nprobe = 1.0, 1  # whatever the file held
    r = DenseRetriever(b, "cpu", exact_filter_max=0)
    assert faiss.extract_index_ivf(r.cpu_index).nprobe == b.manifest["index"]["nprobe"]
    assert r.cpu_index.k_factor == b.manifest["index"]["k_factor"]
    qs = b.vectors[:8]
    rows = r.search(qs, [10] * 8, [None] * 8)
    assert [row[0] for row in rows] == list(range(8))  # each vector finds itself first


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_traced_encoder_gives_the_eager_vectors_at_any_batch_shape(dtype):
    from common.encoding import TextEncoder
    from training.__main__ import default_encoder_dir

    eager = TextEncoder(default_encoder_dir(), device="cpu", dtype=dtype)
    traced = TextEncoder(default_encoder_dir(), device="cpu", dtype=dtype, trace=True)
    assert eager.traced is None and traced.traced is not None
    for texts in (["drill"], ["a much longer query about outdoor gas fire pits with covers and a spark screen"],
                  ["x", "white kitchen sink faucet with sprayer", "cordless drill kit 20v"], ["" + "tile " * 200]):
        np.testing.assert_allclose(traced.encode(texts, batch_size=4), eager.encode(texts, batch_size=4), atol=1e-5)


def test_bf16_vectors_stay_next_to_fp32_and_rank_alike():
    # bfloat16 holds the weights in bf16 (not autocast): on any CPU kind its vectors are fp32's to
    # cosine >= 0.999 (0.9998 measured on Home Depot queries), closer than int8's (> 0.95).
    import torch

    from common.encoding import TextEncoder
    from training.__main__ import default_encoder_dir

    fp32 = TextEncoder(default_encoder_dir(), device="cpu", dtype="float32")
    bf16 = TextEncoder(default_encoder_dir(), device="cpu", dtype="bfloat16", trace=True)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    titles = ["DEWALT 20V MAX cordless drill driver kit", "Glacier Bay white kitchen sink faucet with sprayer",
              "Behr premium deck stain in cedar", "Rain Bird garden hose nozzle", "Hampton Bay LED ceiling fan"]
    queries = ["cordless drill", "kitchen faucet", "deck stain", "hose nozzle", "ceiling fan light"]
    qb, q32 = bf16.encode(queries), fp32.encode(queries)
    assert qb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(qb, axis=1), 1.0, atol=1e-5)
    assert ((qb * q32).sum(1) > 0.999).all() and not np.array_equal(qb, q32)
    assert ((qb @ bf16.encode(titles).T).argmax(1) == np.arange(5)).all()


def test_int8_encoder_quantizes_every_linear_and_keeps_the_ranking():
    import torch

    from common.encoding import TextEncoder
    from training.__main__ import default_encoder_dir

    fp32 = TextEncoder(default_encoder_dir(), device="cpu", dtype="float32")
    int8 = TextEncoder(default_encoder_dir(), device="cpu", dtype="int8")
    traced = TextEncoder(default_encoder_dir(), device="cpu", dtype="int8", trace=True)
    mods = list(int8.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in mods)
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in mods) == 6 * 6 + 1  # 6 per layer, pooler
    titles = ["DEWALT 20V MAX cordless drill driver kit", "Glacier Bay white kitchen sink faucet with sprayer",
              "Behr premium deck stain in cedar", "Rain Bird garden hose nozzle", "Hampton Bay LED ceiling fan"]
    queries = ["cordless drill", "kitchen faucet", "deck stain", "hose nozzle", "ceiling fan light"]
    q8, q32 = int8.encode(queries), fp32.encode(queries)
    np.testing.assert_allclose(np.linalg.norm(q8, axis=1), 1.0, atol=1e-5)
    assert ((q8 * q32).sum(1) > 0.95).all()  # close to fp32, not equal
    assert not np.allclose(q8, q32, atol=1e-3)
    for q in (int8, traced):
        assert ((q.encode(queries) @ q.encode(titles).T).argmax(1) == np.arange(5)).all()
    np.testing.assert_allclose(traced.encode(queries, batch_size=2), int8.encode(queries, batch_size=2), atol=1e-5)


def test_price_bounds_compare_exact_prices_and_huge_ones_do_not_overflow():
    import warnings

    from server.retrieval import filter_mask
    from server.types import Filters

    class Items(SimpleNamespace):
        def __len__(self):
            return len(self.price_exact)

    items = Items(price_exact=np.array([1.0, 9.99, np.nan, 250.0, 322.99]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert filter_mask(items, Filters(min_price=1e300)).tolist() == [False] * 5
        assert filter_mask(items, Filters(max_price=1e300)).tolist() == [True, True, False, True, True]
        assert filter_mask(items, Filters(min_price=-1e300, max_price=9.99)).tolist() == [True, True, False, False, False]
        # Bounds equal to a price admit it, on both sides (the exact double, not a float32 neighbour).
        assert filter_mask(items, Filters(min_price=9.99)).tolist() == [False, True, False, True, True]
        assert filter_mask(items, Filters(min_price=322.99, max_price=322.99)).tolist() == [False] * 4 + [True]
        assert filter_mask(items, Filters(max_price=322.98999)).tolist() == [True, True, False, True, False]


def test_a_category_filter_admits_its_whole_subtree():
    from common.text import normalise_path
    from server.retrieval import category_ids, filter_mask
    from server.types import Filters

    names = ["toys > vehicles > trains", "toys > vehicles", "toys>vehicles2", "toys > puzzles", "garden", "toy"]

    class Items(SimpleNamespace):
        def __len__(self):
            return len(self.category_id)

    items = Items(category_paths=[normalise_path(n).lower() for n in names],
                  category_id=np.arange(len(names), dtype=np.int32))
    assert sorted(category_ids(items, ["Toys > Vehicles"])) == [0, 1]  # the level and below, not a sibling "vehicles2"
    assert sorted(category_ids(items, ["toys"])) == [0, 1, 2, 3]  # not "toy"
    assert sorted(category_ids(items, ["TOYS>Vehicles>Trains", "garden"])) == [0, 4]  # any spacing, any case
    assert category_ids(items, ["Toys > Veh"]) == [] and category_ids(items, ["nothing"]) == []
    assert filter_mask(items, Filters(categories=("Toys > Puzzles",))).tolist() == [False, False, False, True, False,
                                                                                   False]
