"""Product classification as served, on a real server: the Classify RPC (items and free text, top-k paths of
the taxonomy with per-level probabilities), the query's category in Search, category auto-fill in UpsertItems
(filled only above the threshold, marked predicted, never over a merchant's category, durable, switchable),
the error statuses, and `training build --classifier-data / --classifier-from`.

The bundle: the sample catalog (minimal build) with a classifier trained for one epoch on the synthetic
hierarchical catalog of test_classify.py (two to three levels). Its dev split is too small to show 95%
precision, so its own auto-fill threshold is 1.0 (never); the auto-fill tests run the server with
--autofill-threshold 0.5 and one test checks the bundle's own threshold keeps auto-fill off.
"""
from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

from tests.conftest import HOSE, LOCOMOTIVE, SAMPLE, ServerThread, make_config, rpc_error, serve
from tests.test_classify import TREE, synthetic_csv
from training.__main__ import main as training_main


@pytest.fixture(scope="module")
def clf_server(clf_bundle, tmp_path_factory):
    yield from serve(clf_bundle, state_dir=tmp_path_factory.mktemp("state"), fsync=False, autofill_threshold=0.5)


@pytest.fixture(scope="module")
def clf_stub(clf_server):
    from server.stubs import pb_grpc

    with grpc.insecure_channel(clf_server.target) as ch:
        yield pb_grpc.SearchRecommendStub(ch)


def leaves_of(bundle) -> list[str]:
    return json.loads((bundle / "classifier" / "taxonomy.json").read_text())["leaves"]


def test_build_attaches_a_verified_classifier(clf_bundle):
    manifest = json.loads((clf_bundle / "manifest.json").read_text())
    assert manifest["classifier"]["path"] == "classifier" and manifest["classifier"]["leaves"] == len(TREE)
    assert any(f.startswith("classifier/encoder/") for f in manifest["files"])  # checksummed with the rest
    assert sorted(leaves_of(clf_bundle)) == sorted(TREE)
    assert not list(clf_bundle.parent.glob(".bundle.*"))  # no half-built sibling left behind


def test_classify_items_and_queries_give_real_paths_with_level_probabilities(clf_stub, clf_bundle, pb):
    leaves = set(leaves_of(clf_bundle))
    resp = clf_stub.Classify(pb.ClassifyRequest(items=[pb.ClassifyItem(title=LOCOMOTIVE), pb.ClassifyItem(title=HOSE)],
                                                queries=["jigsaw puzzle"], k=3), timeout=60)
    assert len(resp.items) == 2 and len(resp.queries) == 1 and resp.bundle_version
    for res in list(resp.items) + list(resp.queries):
        probs = [c.probability for c in res.categories]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        for c in res.categories:
            assert c.path in leaves  # the hierarchy constraint: only real paths of the taxonomy
            parts = c.path.split(" > ")
            assert [lv.name for lv in c.levels] == [" > ".join(parts[: i + 1]) for i in range(len(parts))]
            level_probs = [lv.probability for lv in c.levels]
            assert level_probs == sorted(level_probs, reverse=True)  # a prefix holds at least its leaf's mass
            assert level_probs[-1] == pytest.approx(c.probability, abs=1e-6)
        assert res.confident == (res.categories[0].probability >= resp.autofill_threshold)
    assert resp.items[0].categories[0].path == "Toys > Vehicles > Trains"
    assert resp.items[1].categories[0].path == "Garden > Hoses"
    assert resp.queries[0].categories[0].path == "Toys > Puzzles"
    # k beyond the taxonomy's size: every path, once; unset k: 3.
    many = clf_stub.Classify(pb.ClassifyRequest(queries=["spade"], k=50), timeout=60).queries[0].categories
    assert sorted(c.path for c in many) == sorted(leaves)
    assert sum(c.probability for c in many) == pytest.approx(1.0, abs=1e-4)
    assert len(clf_stub.Classify(pb.ClassifyRequest(queries=["spade"]), timeout=60).queries[0].categories) == 3


def test_classify_takes_a_full_request_in_one_queue_entry(clf_stub, pb):
    # More entries than the batcher's queue holds (64): one request is one entry, not hundreds.
    resp = clf_stub.Classify(pb.ClassifyRequest(items=[pb.ClassifyItem(title=f"{HOSE} {i}") for i in range(300)],
                                                k=1), timeout=120)
    assert len(resp.items) == 300 and {r.categories[0].path for r in resp.items} == {"Garden > Hoses"}


def field_of(err: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    return bad.field_violations[0].field


def test_classify_errors_name_the_field_and_the_limit(clf_stub, clf_server, pb):
    cases = [
        (pb.ClassifyRequest(items=[pb.ClassifyItem(title=HOSE), pb.ClassifyItem(title="  ")]), "items[1].title",
         "must not be empty"),
        (pb.ClassifyRequest(), "items", "at least one"),
        (pb.ClassifyRequest(queries=["hose"], k=0), "k", "between 1 and 50"),
        (pb.ClassifyRequest(queries=["hose"], k=51), "k", "between 1 and 50"),
        (pb.ClassifyRequest(queries=["ok", "bad\x07"]), "queries[1]", "control characters"),
        (pb.ClassifyRequest(items=[pb.ClassifyItem(title="x" * 501)]), "items[0].title", "the limit is 500"),
        (pb.ClassifyRequest(items=[pb.ClassifyItem(title=HOSE, attributes={f"a{i}": "v" for i in range(51)})]),
         "items[0].attributes", "the limit is 50"),
    ]
    limit = clf_server.config.max_write_batch
    cases.append((pb.ClassifyRequest(queries=["hose"] * (limit + 1)), "queries", f"the limit is {limit}"))
    for request, field, text in cases:
        err = rpc_error(clf_stub.Classify, request, timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.details())
        assert text in err.details() and field_of(err) == field


def test_classify_answers_hostile_input_with_a_clear_status(clf_stub, pb):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from loadtest import hostile
    from tests.test_hostile import HypothesisDraw

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        name, request = hostile.classify(pb, HypothesisDraw(data))
        code, details, field = hostile.call(clf_stub, name, request)
        assert hostile.problem(name, code, details, field) is None

    check()


def test_a_bundle_without_a_classifier_is_a_failed_precondition(stub, pb):
    err = rpc_error(stub.Classify, pb.ClassifyRequest(queries=["hose"]), timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "has no classifier" in err.details()
    assert field_of(err) == "bundle"
    err = rpc_error(stub.Search, pb.SearchRequest(query="drill", classify_query=True), timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and field_of(err) == "classify_query"
    assert not stub.GetInfo(pb.GetInfoRequest()).classifier
    assert not stub.Search(pb.SearchRequest(query="drill"), timeout=30).HasField("predicted_category")


def test_search_returns_the_querys_category_without_changing_the_ranking(clf_stub, clf_bundle, pb):
    plain = clf_stub.Search(pb.SearchRequest(query="jigsaw puzzle", k=10), timeout=30)
    asked = clf_stub.Search(pb.SearchRequest(query="jigsaw puzzle", k=10, classify_query=True), timeout=30)
    assert not plain.HasField("predicted_category")
    assert asked.predicted_category.path == "Toys > Puzzles" and 0 < asked.predicted_category.probability <= 1
    assert [lv.name for lv in asked.predicted_category.levels] == ["Toys", "Toys > Puzzles"]
    assert [i.item_id for i in asked.items] == [i.item_id for i in plain.items]


def item_by_id(stub, pb, item_id: str):
    resp = stub.Search(pb.SearchRequest(query="item", k=1, filters=pb.Filters(item_ids=[item_id])), timeout=30)
    assert len(resp.items) == 1
    return resp.items[0]


def test_upsert_fills_missing_categories_only_and_marks_them(clf_stub, clf_server, pb):
    info = clf_stub.GetInfo(pb.GetInfoRequest())
    assert info.classifier and info.classifier_categories == len(TREE)
    assert info.autofill_categories and info.autofill_threshold == pytest.approx(0.5)
    items = [pb.Item(item_id="af-1", title=LOCOMOTIVE, in_stock=True),
             pb.Item(item_id="af-2", title=LOCOMOTIVE, category="Garden > Hoses", in_stock=True),  # the merchant's
             pb.Item(item_id="af-3", title=HOSE, brand="Bolt", in_stock=True)]
    resp = clf_stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=60)
    assert resp.upserted == 3
    fills = {f.item_id: f for f in resp.category_fills}
    assert set(fills) == {"af-1", "af-3"}  # af-2 had a category: not classified, not touched
    for f in fills.values():
        assert f.filled == (f.probability >= 0.5)
    assert fills["af-1"].category == "Toys > Vehicles > Trains" and fills["af-1"].filled
    first = item_by_id(clf_stub, pb, "af-1")
    assert first.category == "Toys > Vehicles > Trains" and first.category_predicted
    merchant = item_by_id(clf_stub, pb, "af-2")
    assert merchant.category == "Garden > Hoses" and not merchant.category_predicted
    # A predicted category is a category like any other: it filters.
    hits = clf_stub.Search(pb.SearchRequest(query="locomotive", k=50, filters=pb.Filters(
        categories=["Toys > Vehicles > Trains"])), timeout=30)
    assert "af-1" in [i.item_id for i in hits.items] and "af-2" not in [i.item_id for i in hits.items]
    # Selecting a level of the path filters to everything under it.
    for level in ("Toys", "toys>vehicles"):
        under = clf_stub.Search(pb.SearchRequest(query="locomotive", k=50, filters=pb.Filters(categories=[level])),
                                timeout=30)
        assert "af-1" in [i.item_id for i in under.items]
    # Re-upserted with the merchant's own category: the mark goes.
    clf_stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="af-1", title=LOCOMOTIVE, category="Toys",
                                                              in_stock=True)]), timeout=60)
    again = item_by_id(clf_stub, pb, "af-1")
    assert again.category == "Toys" and not again.category_predicted


def test_predicted_categories_survive_a_restart(clf_bundle, tmp_path, pb):
    from server.stubs import pb_grpc

    config = make_config(clf_bundle, state_dir=tmp_path, autofill_threshold=0.5)
    srv = ServerThread(config).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            resp = stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="keep-1", title=HOSE)]), timeout=60)
            assert resp.category_fills[0].filled
    finally:
        srv.stop()
    srv = ServerThread(config).start()  # the log is replayed: the same category, still marked predicted
    try:
        with grpc.insecure_channel(srv.target) as ch:
            item = item_by_id(pb_grpc.SearchRecommendStub(ch), pb, "keep-1")
            assert item.category == "Garden > Hoses" and item.category_predicted
    finally:
        srv.stop()


@pytest.mark.parametrize("overrides", [{"autofill_categories": False}, {}], ids=["flag-off", "bundle-threshold"])
def test_no_autofill_when_turned_off_or_the_bundle_cannot_vouch_for_it(clf_bundle, tmp_path, pb, overrides):
    from server.stubs import pb_grpc

    manifest = json.loads((clf_bundle / "manifest.json").read_text())
    assert manifest["classifier"]["autofill_threshold"] == 1.0  # 20 dev rows cannot show 95% precision
    srv = ServerThread(make_config(clf_bundle, state_dir=tmp_path, fsync=False, **overrides)).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            assert not stub.GetInfo(pb.GetInfoRequest()).autofill_categories
            resp = stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="off-1", title=LOCOMOTIVE)]),
                                    timeout=60)
            assert resp.upserted == 1 and not resp.category_fills
            item = item_by_id(stub, pb, "off-1")
            assert item.category == "" and not item.category_predicted
            assert stub.Classify(pb.ClassifyRequest(queries=["hose"]), timeout=30).queries  # Classify still works
    finally:
        srv.stop()


def test_upsert_of_more_items_than_the_queue_holds(clf_stub, pb):
    items = [pb.Item(item_id=f"bulk-{i}", title=f"{HOSE} {i}", in_stock=True) for i in range(150)]
    resp = clf_stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=120)
    assert resp.upserted == 150 and len(resp.category_fills) == 150
    assert item_by_id(clf_stub, pb, "bulk-149").category == "Garden > Hoses"


def test_top_and_fills_rules():
    from common.classifier import Taxonomy
    from server.classify import ServedClassifier

    class Stub:
        tax = Taxonomy.from_paths(TREE)

    served = ServedClassifier(Stub(), None, threshold=0.6)
    probs = np.zeros(len(TREE), np.float32)
    probs[Stub.tax.index["Garden > Hoses"]] = 0.6
    probs[Stub.tax.index["Garden > Tools > Spades"]] = 0.3
    probs[Stub.tax.index["Toys > Puzzles"]] = 0.1
    top = served.top(probs, 2)
    assert [p.path for p in top.predictions] == ["Garden > Hoses", "Garden > Tools > Spades"] and top.confident
    assert top.predictions[1].levels == (("Garden", pytest.approx(0.9)), ("Garden > Tools", pytest.approx(0.3)),
                                         ("Garden > Tools > Spades", pytest.approx(0.3)))
    assert not ServedClassifier(Stub(), None, threshold=0.61).top(probs, 1).confident
    never = ServedClassifier(Stub(), None, threshold=1.0)
    assert not never.autofills and not never.fills(1.0)


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "traced"])
def test_served_probabilities_match_the_training_side_model(clf_bundle, trace, tmp_path):
    # fp32: the server's path (TextEncoder mean pooling + numpy head) against the training side's network.
    from common.bundle_format import read_manifest
    from common.classifier import Classifier
    from server.classify import ServedClassifier

    texts = [LOCOMOTIVE, HOSE, "jigsaw puzzle", "a b c", "Jade floor puzzle classic 7 with a much longer title " * 3]
    served = ServedClassifier.load(clf_bundle, read_manifest(clf_bundle)["files"], "cpu", "float32", None,
                                   trace=trace, graph_cache=tmp_path)
    reference = Classifier.load(clf_bundle, bf16=False).predict_proba(texts)
    assert np.allclose(served.probabilities(texts), reference, atol=1e-4)


def test_classifier_from_copies_a_verified_classifier_and_refuses_a_damaged_one(tmp_path, capsys):
    data = synthetic_csv(tmp_path / "shop.csv", rows_per_leaf=20)
    clf = tmp_path / "clf"
    assert training_main(["build-classifier", "--data", str(data), "--out", str(clf), "--epochs", "1",
                          "--max-minutes", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    out = tmp_path / "search"
    assert training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--out", str(out), "--device", "cpu",
                          "--dtype", "float32", "--classifier-from", str(clf)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classifier"]["source_bundle"] == json.loads((clf / "manifest.json").read_text())["bundle_version"]
    damaged = tmp_path / "damaged"
    shutil.copytree(clf, damaged)
    with open(damaged / "classifier" / "head.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    capsys.readouterr()
    bad_out = tmp_path / "bad"
    assert training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--out", str(bad_out), "--device",
                          "cpu", "--classifier-from", str(damaged)]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    assert not bad_out.exists() and not list(tmp_path.glob(".bad.*"))
    assert training_main(["build", "--out", str(tmp_path / "x"), "--classifier"]) == 2  # nothing to train on
