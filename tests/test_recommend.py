"""Recommend, Feedback, UpsertItems, DeleteItems and SimilarItems blending on the sample bundle (which
was built with the sample's synthetic shoppers), over real gRPC."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pandas as pd
import pytest

from tests.conftest import SAMPLE, field_of, rpc_error, serve


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return pd.read_json(SAMPLE / "catalog.jsonl", lines=True).set_index("item_id")


@pytest.fixture(scope="module")
def histories() -> dict[str, list[str]]:
    df = pd.read_csv(SAMPLE / "interactions.csv").sort_values("timestamp", kind="stable")
    return {u: g["item_id"].tolist() for u, g in df.groupby("user_id")}


@pytest.fixture()
def live(sample_bundle, tmp_path):
    """A server with a state dir of its own (fresh per test)."""
    from server.stubs import pb_grpc

    gen = serve(sample_bundle, state_dir=tmp_path / "state")
    srv = next(gen)
    with grpc.insecure_channel(srv.target) as ch:
        srv.stub = pb_grpc.SearchRecommendStub(ch)
        yield srv
    next(gen, None)


def ids(resp) -> list[str]:
    return [it.item_id for it in resp.items]


def recommend(stub, pb, user="", recent=(), k=10, **filters):
    req = pb.RecommendRequest(user_id=user, recent_item_ids=list(recent), k=k)
    if filters:
        req.filters.CopyFrom(pb.Filters(**filters))
    return stub.Recommend(req, timeout=30)


def event(pb, eid, user, item, kind="PURCHASE", **kw):
    return pb.Event(event_id=eid, user_id=user, item_id=item, type=getattr(pb.Event, kind), **kw)


# --- Recommend -------------------------------------------------------------------------------

def test_known_users_get_their_departments_and_never_what_they_bought(stub, pb, catalog, histories):
    share, users = [], sorted(histories)[:40]
    for user in users:
        got = ids(recommend(stub, pb, user))
        assert len(got) == 10 and len(set(got)) == 10
        assert not set(got) & set(histories[user]), "bought items came back (the sample has no repeat purchases)"
        depts = set(catalog.loc[histories[user], "category"])
        share.append(np.mean([catalog.loc[i, "category"] in depts for i in got]))
    # Shoppers work inside one or two of eight departments; a random list would score about 0.2.
    assert np.mean(share) >= 0.7


def test_recommend_is_better_than_popularity_on_the_last_item(stub, pb, histories):
    # The sample bundle was trained on all events, so this is a fit check of the serving path: the
    # user's own last item (excluded as bought) is replaced by asking with the history minus it.
    hits_model = hits_pop = 0
    counts = Counter(i for h in histories.values() for i in h)
    popular = [i for i, _ in counts.most_common(20)]
    for user, h in sorted(histories.items())[:100]:
        got = ids(recommend(stub, pb, "", recent=h[:-1], k=20))
        hits_model += h[-1] in got
        hits_pop += h[-1] in [i for i in popular if i not in h[:-1]][:20]
    assert hits_model > 2 * hits_pop


def test_unknown_user_gets_popular_items_not_an_error(stub, pb, histories):
    got = ids(recommend(stub, pb, "someone-new", k=5))
    counts = Counter(i for h in histories.values() for i in h)
    top = {i for i, _ in counts.most_common(15)}
    assert len(got) == 5 and len(set(got) & top) >= 3


def test_cold_start_honours_filters(stub, pb, catalog):
    got = ids(recommend(stub, pb, "", k=8, categories=["Bath"], in_stock_only=True))
    assert len(got) == 8 and all(catalog.loc[i, "category"] == "Bath" and catalog.loc[i, "in_stock"] for i in got)


def test_recent_items_steer_an_anonymous_session(stub, pb, catalog):
    drills = [i for i in catalog.index if catalog.loc[i, "attributes"]["product_type"] == "cordless drill"][:3]
    got = ids(recommend(stub, pb, "", recent=drills, k=10))
    assert not set(got) & set(drills)
    assert np.mean([catalog.loc[i, "category"] == "Power Tools" for i in got]) >= 0.7


def test_recommend_filters(stub, pb, catalog, histories):
    user = sorted(histories)[0]
    got = ids(recommend(stub, pb, user, k=5, max_price=50.0))
    assert got and all(catalog.loc[i, "price"] <= 50.0 for i in got)


@pytest.mark.parametrize("recent,field", [(["NOPE"], "recent_item_ids[0]"), (["SR-00001", "gone"], "recent_item_ids[1]")])
def test_unknown_recent_items_are_not_found(stub, pb, recent, field):
    err = rpc_error(recommend, stub, pb, "u", recent=recent)
    assert err.code() == grpc.StatusCode.NOT_FOUND and field_of(err) == field


def test_recommend_bad_input(stub, pb):
    err = rpc_error(recommend, stub, pb, "u", recent=["SR-00001"] * 201)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 200" in err.details()
    err = rpc_error(recommend, stub, pb, "u", k=0)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "k"
    err = rpc_error(recommend, stub, pb, "u\x00")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "user_id"


def test_similar_items_blend_co_occurrence(stub, pb):
    resp = stub.SimilarItems(pb.SimilarItemsRequest(item_id="SR-00002", k=5, explain=True), timeout=30)
    names = {c.name for c in resp.items[0].explanation}
    assert "co_occurrence" in names
    for it in resp.items:
        assert sum(c.contribution for c in it.explanation) == pytest.approx(it.score, abs=1e-4)


# --- Feedback ------------------------------------------------------------------------------------

def test_feedback_changes_the_very_next_recommend(live, pb, catalog):
    stub = live.stub
    before = ids(recommend(stub, pb, "shopper-1"))
    bath = [i for i in catalog.index if catalog.loc[i, "category"] == "Bath"][:3]
    resp = stub.Feedback(pb.FeedbackRequest(events=[event(pb, f"e{n}", "shopper-1", i) for n, i in enumerate(bath)]))
    assert resp.accepted == 3 and resp.duplicates == 0
    after = ids(recommend(stub, pb, "shopper-1"))
    assert after != before
    assert not set(after) & set(bath), "just-bought items must not be recommended"
    assert np.mean([catalog.loc[i, "category"] == "Bath" for i in after]) >= 0.6


def test_views_stay_recommendable_purchases_do_not(live, pb):
    stub = live.stub
    stub.Feedback(pb.FeedbackRequest(events=[event(pb, "v1", "viewer", "SR-00002", "VIEW")]))
    got_view = ids(recommend(stub, pb, "viewer", k=50, item_ids=["SR-00002", "SR-00003"]))
    assert "SR-00002" in got_view
    stub.Feedback(pb.FeedbackRequest(events=[event(pb, "p1", "viewer", "SR-00002", "PURCHASE")]))
    assert "SR-00002" not in ids(recommend(stub, pb, "viewer", k=50, item_ids=["SR-00002", "SR-00003"]))


def test_feedback_is_idempotent_by_event_id(live, pb):
    stub = live.stub
    evs = [event(pb, "same", "u1", "SR-00001"), event(pb, "same", "u1", "SR-00001")]
    first = stub.Feedback(pb.FeedbackRequest(events=evs))
    again = stub.Feedback(pb.FeedbackRequest(events=evs[:1]))
    assert (first.accepted, first.duplicates) == (1, 1)
    assert (again.accepted, again.duplicates) == (0, 1)
    state = live.server.holder.live
    assert state.user_events("u1") == [("SR-00001", 4)]


def test_feedback_applies_all_or_nothing(live, pb):
    stub = live.stub
    log_size = live.server.holder.live.log.size
    err = rpc_error(stub.Feedback, pb.FeedbackRequest(events=[event(pb, "ok", "u2", "SR-00001"),
                                                              event(pb, "bad", "u2", "NOPE")]))
    assert err.code() == grpc.StatusCode.NOT_FOUND and field_of(err) == "events[1].item_id"
    assert "NOPE" in err.details()
    assert live.server.holder.live.user_events("u2") == []
    assert live.server.holder.live.log.size == log_size
    assert stub.Feedback(pb.FeedbackRequest(events=[event(pb, "ok", "u2", "SR-00001")])).accepted == 1


@pytest.mark.parametrize("make,field,needle", [
    (lambda pb: [event(pb, "", "u", "SR-00001")], "events[0].event_id", "empty"),
    (lambda pb: [event(pb, "e", "", "SR-00001")], "events[0].user_id", "empty"),
    (lambda pb: [pb.Event(event_id="e", user_id="u", item_id="SR-00001")], "events[0].type", "VIEW"),
    (lambda pb: [event(pb, "e", "u", "SR-00001", timestamp_ms=int(time.time() * 1000) + 86_400_000)],
     "events[0].timestamp_ms", "future"),
    (lambda pb: [event(pb, "e", "u", "SR-00001", timestamp_ms=-5)], "events[0].timestamp_ms", ">= 0"),
    (lambda pb: [event(pb, "e", "u", "SR-00001", position=-1)], "events[0].position", ">= 0"),
    (lambda pb: [], "events", "empty"),
    (lambda pb: [event(pb, f"e{i}", "u", "SR-00001") for i in range(1001)], "events", "limit is 1000"),
])
def test_feedback_bad_input(live, pb, make, field, needle):
    err = rpc_error(live.stub.Feedback, pb.FeedbackRequest(events=make(pb)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err) == field and needle in err.details()
    assert live.server.holder.live.log.size == 0


def test_user_state_is_bounded(live, pb):
    cap = live.server.holder.config.max_user_events
    evs = [event(pb, f"b{i}", "busy", f"SR-{i % 300 + 1:05d}", "VIEW") for i in range(cap + 30)]
    live.stub.Feedback(pb.FeedbackRequest(events=evs))
    kept = live.server.holder.live.user_events("busy")
    assert len(kept) == cap and kept[-1][0] == evs[-1].item_id


# --- live catalog ---------------------------------------------------------------------------------

def new_item(pb, item_id="NEW-1", title="Zorblax Quantum Cordless Drill 40V", **kw):
    fields = dict(category="Power Tools", brand="Zorblax", price=99.0, in_stock=True)
    fields.update(kw)
    return pb.Item(item_id=item_id, title=title, **fields)


def test_upserted_items_are_searchable_filterable_recommendable(live, pb):
    stub = live.stub
    assert stub.UpsertItems(pb.UpsertItemsRequest(items=[new_item(pb)])).upserted == 1
    assert ids(stub.Search(pb.SearchRequest(query="zorblax quantum drill", k=3)))[0] == "NEW-1"
    only = stub.Search(pb.SearchRequest(query="drill", k=5, filters=pb.Filters(brands=["zorblax"])))
    assert ids(only) == ["NEW-1"]
    assert ids(recommend(stub, pb, "", recent=["SR-00002"], k=5, item_ids=["NEW-1"])) == ["NEW-1"]
    # A new item has no behaviour yet: its recommender vector comes from its text, so it can seed a session.
    got = ids(recommend(stub, pb, "", recent=["NEW-1"], k=10))
    assert got and "NEW-1" not in got
    assert stub.SimilarItems(pb.SimilarItemsRequest(item_id="NEW-1", k=3)).items
    info = stub.GetInfo(pb.GetInfoRequest())
    assert info.item_count == 325 and info.index_size == 325


def test_upserts_land_while_two_compute_threads_serve(sample_bundle, tmp_path, pb):
    """Live catalog changes grow the FAISS index in place; with two compute threads they must wait for
    the running batches and keep new ones out (ComputeGate). Searches, SimilarItems and Recommend run
    from eight threads while twenty upserts land one by one: every call succeeds, and each new item is
    found by its own title at once."""
    from server.stubs import pb_grpc

    gen = serve(sample_bundle, state_dir=tmp_path / "state", compute_workers=2)
    srv = next(gen)
    stop = threading.Event()
    errors: list[Exception] = []
    calls = [0]

    def traffic(stub, n: int) -> None:
        queries = ["drill", "paint roller", "garden hose", "led bulb"]
        while not stop.is_set():
            try:
                if n % 3 == 0:
                    stub.SimilarItems(pb.SimilarItemsRequest(item_id="SR-00002", k=5), timeout=30)
                elif n % 3 == 1:
                    recommend(stub, pb, "", recent=["SR-00002"], k=5)
                else:
                    assert len(stub.Search(pb.SearchRequest(query=queries[calls[0] % 4], k=5), timeout=30).items) == 5
                calls[0] += 1
            except Exception as exc:  # collected: an assertion in a thread would be lost
                errors.append(exc)
                return

    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            threads = [threading.Thread(target=traffic, args=(stub, n)) for n in range(8)]
            for t in threads:
                t.start()
            for i in range(20):
                item = new_item(pb, f"NEW-{i}", f"Quuxwidget Model{i} Hyperspanner", brand="Quux")
                assert stub.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=60).upserted == 1
                assert ids(stub.Search(pb.SearchRequest(query=f"quuxwidget model{i} hyperspanner", k=1),
                                       timeout=30)) == [f"NEW-{i}"]
            stop.set()
            for t in threads:
                t.join(60)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    finally:
        stop.set()
        next(gen, None)
    assert not errors, errors[:3]
    assert calls[0] > 20
    assert info.item_count == 344 and info.index_size == 344


def test_changed_item_replaces_the_old_one(live, pb):
    stub = live.stub
    stub.UpsertItems(pb.UpsertItemsRequest(items=[new_item(pb, "SR-00001", "Glorbnik Hyperdrill Deluxe",
                                                           brand="Glorbnik", price=5.0)]))
    hits = stub.Search(pb.SearchRequest(query="glorbnik hyperdrill", k=3))
    assert hits.items[0].item_id == "SR-00001" and hits.items[0].brand == "Glorbnik"
    assert ids(hits).count("SR-00001") == 1
    cheap = ids(stub.Search(pb.SearchRequest(query="drill", k=50, filters=pb.Filters(max_price=6.0))))
    assert "SR-00001" in cheap
    # The old version (a $197.99 DeWalt) is gone: its old title and price no longer find it.
    old = ids(stub.Search(pb.SearchRequest(query="DeWalt 12V Brushless Cordless Compact Drill", k=50,
                                           filters=pb.Filters(min_price=100.0))))
    assert "SR-00001" not in old


def test_deleted_items_disappear_from_every_rpc(live, pb):
    stub = live.stub
    assert "SR-00002" in ids(stub.Search(pb.SearchRequest(query="DeWalt 20V MAX Cordless Drill/Driver Kit", k=5)))
    assert stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["SR-00002"])).deleted == 1
    assert "SR-00002" not in ids(stub.Search(pb.SearchRequest(query="DeWalt 20V MAX Cordless Drill/Driver Kit", k=50)))
    assert "SR-00002" not in ids(stub.SimilarItems(pb.SimilarItemsRequest(item_id="SR-00003", k=100)))
    assert "SR-00002" not in ids(recommend(stub, pb, "", recent=["SR-00003"], k=100))
    assert "SR-00002" not in ids(recommend(stub, pb, "", k=400))
    err = rpc_error(stub.SimilarItems, pb.SimilarItemsRequest(item_id="SR-00002"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(stub.DeleteItems, pb.DeleteItemsRequest(item_ids=["SR-00002"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND and field_of(err) == "item_ids[0]"


@pytest.mark.parametrize("items,field,needle", [
    (lambda pb: [pb.Item(item_id="X", title="")], "items[0].title", "empty"),
    (lambda pb: [pb.Item(item_id="", title="t")], "items[0].item_id", "empty"),
    (lambda pb: [pb.Item(item_id="X", title="t", price=float("nan"))], "items[0].price", "finite"),
    (lambda pb: [pb.Item(item_id="X", title="t", price=-1)], "items[0].price", ">= 0"),
    (lambda pb: [pb.Item(item_id="X", title="t" * 501)], "items[0].title", "limit is 500"),
    (lambda pb: [pb.Item(item_id="X", title="a"), pb.Item(item_id="X", title="b")], "items[1].item_id", "twice"),
    (lambda pb: [pb.Item(item_id=f"X{i}", title="t") for i in range(1001)], "items", "limit is 1000"),
])
def test_upsert_bad_input_changes_nothing(live, pb, items, field, needle):
    err = rpc_error(live.stub.UpsertItems, pb.UpsertItemsRequest(items=items(pb)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == field and needle in err.details()
    assert live.stub.GetInfo(pb.GetInfoRequest()).item_count == 324


def test_live_changes_survive_restart_and_reload(sample_bundle, tmp_path, pb):
    from server.stubs import pb_grpc

    state = tmp_path / "state"
    gen = serve(sample_bundle, state_dir=state)
    srv = next(gen)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.SearchRecommendStub(ch)
        stub.UpsertItems(pb.UpsertItemsRequest(items=[new_item(pb)]))
        stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["SR-00005"]))
        stub.Feedback(pb.FeedbackRequest(events=[event(pb, "r1", "returning", "SR-00100")]))
        expected = ids(recommend(stub, pb, "returning"))
        stub.ReloadBundle(pb.ReloadBundleRequest())  # a bundle without the change: it is re-applied
        assert ids(stub.Search(pb.SearchRequest(query="zorblax quantum drill", k=1))) == ["NEW-1"]
    next(gen, None)
    gen = serve(sample_bundle, state_dir=state)
    srv = next(gen)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.SearchRecommendStub(ch)
        assert ids(stub.Search(pb.SearchRequest(query="zorblax quantum drill", k=1))) == ["NEW-1"]
        assert rpc_error(stub.SimilarItems, pb.SimilarItemsRequest(item_id="SR-00005")).code() == grpc.StatusCode.NOT_FOUND
        assert ids(recommend(stub, pb, "returning")) == expected
        assert srv.server.holder.live.replay_report.records == 3
    next(gen, None)


# --- event log --------------------------------------------------------------------------------------

def test_torn_tail_is_dropped_and_reported(tmp_path):
    from common.eventlog import EventLog, encode_record, read_log
    from server.state import Event, LiveState

    state = LiveState(tmp_path)
    state.record_events([Event("a", "u", "SR-00001", 4, 1)])
    state.record_events([Event("b", "u", "SR-00002", 4, 2)])
    state.close()
    torn = encode_record({"kind": "feedback", "events": [Event("c", "u", "SR-00003", 4, 3).record()]})
    with open(tmp_path / "events.log", "ab") as fh:
        fh.write(torn[: len(torn) // 2])  # a crash in the middle of an append
    again = LiveState(tmp_path)
    assert [i for i, _ in again.user_events("u")] == ["SR-00001", "SR-00002"]
    assert again.replay_report.torn_bytes == len(torn) // 2 and "torn" in again.replay_report.problem
    again.record_events([Event("d", "u", "SR-00004", 4, 4)])  # appends continue after the last good record
    again.close()
    scan = read_log(tmp_path / "events.log")
    assert scan.torn_bytes == 0 and len(scan.records) == 3
    log = EventLog(tmp_path)
    assert log.scan.problem == ""
    log.close()


def test_corrupt_record_stops_replay_at_the_last_good_one(tmp_path):
    from common.eventlog import read_log
    from server.state import Event, LiveState

    state = LiveState(tmp_path)
    for i in range(3):
        state.record_events([Event(f"e{i}", "u", f"SR-0000{i + 1}", 1, i)])
    state.close()
    data = bytearray((tmp_path / "events.log").read_bytes())
    data[-3] ^= 0xFF  # flip a bit inside the last record's payload
    (tmp_path / "events.log").write_bytes(bytes(data))
    scan = read_log(tmp_path / "events.log")
    assert len(scan.records) == 2 and "checksum" in scan.problem


def test_bytes_per_user_is_stated_and_bounded():
    from server.state import bytes_per_user

    per_user = bytes_per_user(50)
    assert 1_000 < per_user < 20_000
    print(f"per-user state at 50 events: {per_user} bytes; 1M users: {per_user * 1e6 / 2**30:.1f} GiB")


# --- kernels ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rec_features_kernel_matches_numpy_twin(seed):
    from kernels import recfeatures as RK
    from kernels import reference as R

    rng = np.random.default_rng(seed)
    n = 60
    users = 5
    hist = [rng.integers(0, n, rng.integers(0, 12)).astype(np.int32) for _ in range(users)]
    cands = [rng.choice(n, rng.integers(0, 20), replace=False).astype(np.int32) for _ in range(users)]
    off = np.concatenate([[0], np.cumsum([len(c) for c in cands])]).astype(np.int64)
    hp = np.concatenate([[0], np.cumsum([len(h) for h in hist])]).astype(np.int64)
    flat_c = np.concatenate(cands).astype(np.int32)
    flat_h = np.concatenate(hist).astype(np.int32)
    model = rng.normal(size=len(flat_c)).astype(np.float32)
    pop = rng.random(n).astype(np.float32) * 10
    co_lists = [np.sort(rng.choice(n, rng.integers(0, 8), replace=False)) for _ in range(n)]
    co_indptr = np.concatenate([[0], np.cumsum([len(c) for c in co_lists])]).astype(np.int64)
    co_idx = np.concatenate(co_lists).astype(np.int32)
    co_w = rng.random(len(co_idx)).astype(np.float32)
    cat = rng.integers(-1, 4, n).astype(np.int32)
    logp = np.where(rng.random(n) < 0.2, np.nan, rng.normal(3, 1, n)).astype(np.float32)
    args = (off, flat_c, model, hp, flat_h, pop, co_indptr, co_idx, co_w, cat, logp)
    np.testing.assert_allclose(RK.rec_features(*args), R.rec_features(*args), rtol=1e-5, atol=1e-5)


def test_rec_features_empty_batch():
    from kernels import recfeatures as RK

    e32, e64 = np.empty(0, np.int32), np.zeros(1, np.int64)
    out = RK.rec_features(e64, e32, np.empty(0, np.float32), e64, e32, np.zeros(3, np.float32),
                          np.zeros(4, np.int64), e32, np.empty(0, np.float32), np.zeros(3, np.int32),
                          np.zeros(3, np.float32))
    assert out.shape == (0, len(RK.REC_FEATURE_NAMES))


def test_manifest_records_recommender(sample_bundle):
    manifest = json.loads((sample_bundle / "manifest.json").read_text())
    rec = manifest["recommender"]
    assert rec["allow_repeats"] is False and rec["text_projection"] is True
    assert rec["valid_ndcg_rescored"] >= rec["valid_ndcg_model_only"]


def test_queries_resolved_on_a_newer_catalog_are_answered(sample_bundle):
    """A Recommend resolved just after a live upsert may reach an engine one change behind (and the
    reverse): rows never move, so the engine answers with the rows it knows instead of failing."""
    from server.bundle import load_bundle
    from server.recommend import RecEngine, RecQuery

    bundle = load_bundle(sample_bundle)
    engine = RecEngine(bundle, "cpu")
    n = len(bundle.items)
    longer = np.ones(n + 2, bool)
    hits = engine.recommend_batch([RecQuery(history=(3, n + 1), exclude=(3, n + 1), k=5, mask=longer),
                                   RecQuery(history=(3,), exclude=(3,), k=5, mask=np.ones(n - 1, bool))])
    assert [len(h) for h in hits] == [5, 5]
    assert all(h.row < n - 1 for h in hits[1]) and all(h.row != 3 for h in hits[0])
