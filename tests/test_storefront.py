"""Storefront search on a real server: list mode (relevant set, sorting, facets, pages), search as you type,
and Suggest. Each test states what it checks; property tests draw queries, sorts, page sizes and filters."""
from __future__ import annotations

import math
import uuid
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerThread, make_config, rpc_error

QUERIES = ["cordless drill", "patio chairs", "led light bulb", "garden hose", "drill", "lamp", "paint",
           "outdoor furniture", "impact driver", "solar path light"]
SORTS = ["RELEVANCE", "PRICE_ASC", "PRICE_DESC", "POPULARITY", "NEWEST"]


@pytest.fixture(scope="module")
def shop(sample_bundle, tmp_path_factory):
    srv = ServerThread(make_config(sample_bundle, state_dir=tmp_path_factory.mktemp("storefront-state"))).start()
    from searchrec.v1 import searchrec_pb2_grpc as pb_grpc

    with grpc.insecure_channel(srv.target) as ch:
        yield pb_grpc.SearchRecommendStub(ch)
    srv.stop()


def search(stub, pb, query, **kw):
    filters = kw.pop("filters", None)
    req = pb.SearchRequest(query=query, **kw)
    if filters:
        for name, value in filters.items():
            if isinstance(value, list):
                getattr(req.filters, name).extend(value)
            else:
                setattr(req.filters, name, value)
    return stub.Search(req, timeout=60)


def whole_list(stub, pb, query, sort="RELEVANCE", **kw):
    """The unpaginated list: one request with k = the set's size (it fits in a page on the sample)."""
    first = search(stub, pb, query, sort=pb.SortBy.Value(sort), offset=0, k=1, **kw)
    assert first.total_results <= 100, "the sample's lists fit in one page of 100"
    if first.total_results == 0:
        return []
    resp = search(stub, pb, query, sort=pb.SortBy.Value(sort), offset=0, k=max(1, first.total_results), **kw)
    assert resp.total_results == first.total_results
    return [it.item_id for it in resp.items]


def walk(stub, pb, query, sort, k, between=None, **kw):
    """Every page through next_page_token; `between` runs after each page."""
    ids, token, pages = [], "", 0
    while True:
        resp = search(stub, pb, query, sort=pb.SortBy.Value(sort), k=k, paged=True, page_token=token, **kw)
        assert resp.offset == len(ids)
        ids += [it.item_id for it in resp.items]
        pages += 1
        token = resp.next_page_token
        if between is not None:
            between()
        if not token:
            return ids, resp.total_results, pages
        assert pages < 200


# --- pages -----------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.sampled_from(QUERIES), sort=st.sampled_from(SORTS), k=st.integers(1, 7),
       in_stock=st.booleans())
def test_pages_concatenate_to_the_unpaginated_list(shop, pb, query, sort, k, in_stock):
    """Property: walking the pages of any list gives exactly the unpaginated list: no duplicate, no gap."""
    filters = {"in_stock_only": True} if in_stock else None
    full = whole_list(shop, pb, query, sort, filters=filters)
    ids, total, pages = walk(shop, pb, query, sort, k, filters=filters)
    assert ids == full
    assert total == len(full) and len(set(ids)) == len(ids)
    assert pages == max(1, math.ceil(len(full) / k))


def test_a_feedback_event_between_pages_changes_nothing(shop, pb):
    """Feedback (clicks and purchases on the list's own items) arriving between pages: same list, no duplicates."""
    full = whole_list(shop, pb, "cordless drill", "POPULARITY")
    assert len(full) >= 6

    def feedback():
        events = [pb.Event(event_id=uuid.uuid4().hex, user_id="shopper-1", item_id=i, type=pb.Event.PURCHASE,
                           query="cordless drill") for i in full[-3:]]
        assert shop.Feedback(pb.FeedbackRequest(events=events), timeout=30).accepted == 3

    ids, _, _ = walk(shop, pb, "cordless drill", "POPULARITY", 2, between=feedback)
    assert ids == full


def test_page_token_errors(shop, pb):
    first = search(shop, pb, "cordless drill", k=2, paged=True)
    token = first.next_page_token
    assert token
    for bad, why in [(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), "not a page token"),
                     ("!!!not base64!!!", "not a page token"), ("x" * 5000, "limit is 4096")]:
        err = rpc_error(search, shop, pb, "cordless drill", k=2, page_token=bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details() and why in err.details()
    # The token belongs to one list: another query, sort or filter is refused, never silently mixed.
    for kw in ({"query": "patio chairs"}, {"sort": pb.SortBy.Value("PRICE_ASC")},
               {"filters": {"in_stock_only": True}}, {"prefix": True}):
        query = kw.pop("query", "cordless drill")
        err = rpc_error(search, shop, pb, query, k=2, page_token=token, **kw)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "another list" in err.details()


def test_list_mode_limits(shop, pb):
    cases = [({"offset": 1000}, "offset", "depth limit"), ({"offset": -1}, "offset", "between 0 and 999"),
             ({"paged": True, "k": 101}, "k", "1..100"), ({"facets": ["colour"]}, "facets[0]", "category, brand, price"),
             ({"sort": 99}, "sort", "RELEVANCE"), ({"offset": 0, "page_token": "abc"}, "offset", "not both"),
             ({"filters": {"min_price": 50.0, "below_price": 50.0}}, "filters.min_price", "below_price")]
    for kw, field, words in cases:
        err = rpc_error(search, shop, pb, "drill", **kw)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert field in err.details() or field in str(err.trailing_metadata()), (kw, err.details())
        assert words in err.details(), (kw, err.details())
    # The last page of a deep offset is empty, not an error.
    resp = search(shop, pb, "drill", offset=999, k=5)
    assert len(resp.items) == 0 and resp.total_results > 0 and not resp.next_page_token


# --- sorting -----------------------------------------------------------------------------------------

def test_sorting_reorders_the_relevant_set_and_nothing_else(shop, pb, sample_bundle):
    """Every sort returns the same items as relevance; prices ascend / descend (unknown last); popularity
    follows the bundle's popularity; no item outside the relevant set appears."""
    relevance = whole_list(shop, pb, "cordless drill")
    assert 0 < len(relevance) < 324
    resp = search(shop, pb, "cordless drill", sort=pb.SortBy.Value("PRICE_ASC"), offset=0, k=100)
    prices = [it.price if it.HasField("price") else math.inf for it in resp.items]
    assert prices == sorted(prices)
    assert sorted(it.item_id for it in resp.items) == sorted(relevance)
    desc = search(shop, pb, "cordless drill", sort=pb.SortBy.Value("PRICE_DESC"), offset=0, k=100)
    known = [it.price for it in desc.items if it.HasField("price")]
    assert known == sorted(known, reverse=True)
    popularity = np.load(sample_bundle / "popularity.npy")
    import pandas as pd

    row = {i: r for r, i in enumerate(pd.read_parquet(sample_bundle / "items.parquet")["item_id"])}
    pop = search(shop, pb, "cordless drill", sort=pb.SortBy.Value("POPULARITY"), offset=0, k=100)
    values = [float(popularity[row[it.item_id]]) for it in pop.items]
    assert values == sorted(values, reverse=True)
    # The relevant set holds no lamp or patio set for a drill query.
    assert all("Power Tools" in it.category for it in resp.items)


def test_newest_puts_a_new_item_first(shop, pb):
    item = pb.Item(item_id=f"NEW-{uuid.uuid4().hex[:6]}", title="Zorblax 20V Cordless Drill Driver",
                   category="Power Tools", brand="Zorblax", price=59.5, in_stock=True)
    token = shop.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=60).sequence_token
    resp = search(shop, pb, "cordless drill", sort=pb.SortBy.Value("NEWEST"), offset=0, k=5, min_sequence_token=token)
    assert resp.items[0].item_id == item.item_id and resp.items[0].price == 59.5
    # Re-upserting it (a price change) keeps the time it entered the catalog.
    item.price = 61.0
    shop.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=60)
    again = search(shop, pb, "cordless drill", sort=pb.SortBy.Value("NEWEST"), offset=0, k=5)
    assert again.items[0].item_id == item.item_id and again.items[0].price == 61.0
    shop.DeleteItems(pb.DeleteItemsRequest(item_ids=[item.item_id]), timeout=60)


# --- facets ------------------------------------------------------------------------------------------

def brute_force(items) -> dict[str, Counter]:
    cats, brands, prices = Counter(), Counter(), Counter()
    edges = [0, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, math.inf]
    for it in items:
        levels = [p.strip() for p in it.category.split(">") if p.strip()]
        for d in range(len(levels)):
            cats[" > ".join(levels[: d + 1])] += 1
        if it.brand:
            brands[it.brand] += 1
        if it.HasField("price"):
            lo = max(e for e in edges if e <= it.price)
            hi = edges[edges.index(lo) + 1]
            prices[f"{lo:g}-{hi:g}" if hi != math.inf else f"{lo:g}+"] += 1
    return {"category": cats, "brand": brands, "price": prices}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.sampled_from(QUERIES), sort=st.sampled_from(SORTS), max_price=st.sampled_from([None, 100.0, 500.0]))
def test_facet_counts_are_exact(shop, pb, query, sort, max_price):
    """Property: facet counts equal a brute-force count over every item of the relevant set (not one page),
    and selecting a facet value as a filter returns exactly that many items."""
    filters = {"max_price": max_price} if max_price is not None else None
    page = search(shop, pb, query, sort=pb.SortBy.Value(sort), k=2, facets=["category", "brand", "price"],
                  filters=filters)
    everything = search(shop, pb, query, sort=pb.SortBy.Value(sort), offset=0, k=max(1, page.total_results),
                        filters=filters)
    assert len(everything.items) == page.total_results
    truth = brute_force(everything.items)
    got = {f.field: Counter({v.value: v.count for v in f.values}) for f in page.facets}
    assert got == truth
    for f in page.facets:
        for v in f.values[:3]:
            if f.field == "category":
                sel = {"categories": [v.value]}
            elif f.field == "brand":
                sel = {"brands": [v.value]}
            else:
                sel = {"min_price": v.min_price}
                if v.HasField("below_price"):
                    sel["below_price"] = v.below_price
            if max_price is not None:
                sel["max_price"] = max_price
            narrowed = search(shop, pb, query, sort=pb.SortBy.Value(sort), k=1, facets=[f.field], filters=sel)
            assert narrowed.total_results == v.count, (f.field, v.value)


# --- search as you type ------------------------------------------------------------------------------

def test_prefix_search_completes_the_last_word(shop, pb):
    typed = search(shop, pb, "cordless dri", prefix=True, k=5)
    assert typed.items and all("drill" in it.title.lower() or "driver" in it.title.lower() for it in typed.items)
    assert not typed.corrected_query  # an unfinished word is not a typo
    # Each keystroke is a valid search; the finished query's top item is among the typed prefix's.
    full = search(shop, pb, "patio dining set", k=5)
    half = search(shop, pb, "patio din", prefix=True, k=5)
    assert full.items[0].item_id in {it.item_id for it in half.items}
    # Words already finished stay whole: "led " (trailing space) is not expanded.
    assert search(shop, pb, "led ", prefix=True, k=3).items


# --- Suggest -----------------------------------------------------------------------------------------

def suggest(stub, pb, prefix, **kw):
    return stub.Suggest(pb.SuggestRequest(prefix=prefix, **kw), timeout=30).suggestions


def test_suggest_completes_from_the_log_and_the_catalog(shop, pb):
    got = suggest(shop, pb, "cordless d")
    texts = [s.text for s in got]
    assert texts[0] == "cordless drill" and got[0].source == "log"  # a query of the sample's log
    assert all(s.text.startswith("cordless d") or s.corrected for s in got)
    assert all(s.results > 0 and s.top_category for s in got)
    assert any(s.source == "catalog" for s in got)  # phrases mined from titles: suggestions on day one
    # A word nobody searched completes from the catalog's words.
    words = suggest(shop, pb, "ryobi cordl")
    assert any(s.text.startswith("ryobi cordless") for s in words)


def test_suggest_tolerates_one_typo_after_three_characters(shop, pb):
    got = suggest(shop, pb, "patoi")  # swap
    assert got and got[0].text.startswith("patio") and got[0].corrected
    assert suggest(shop, pb, "cordlss d")[0].text.startswith("cordless d")  # deletion
    assert not suggest(shop, pb, "pta")  # the first three characters are taken as typed
    # A one-letter word is too short to call a typo: "cordless d" is not read as "cordless i(mpact)".
    assert not [s for s in suggest(shop, pb, "cordless d") if s.corrected]


def test_suggest_learns_from_feedback_and_filters_zero_results_and_blocked(shop, pb):
    def engaged(query, item="SR-00220"):
        ev = pb.Event(event_id=uuid.uuid4().hex, user_id="shopper-2", item_id=item, type=pb.Event.CLICK, query=query)
        shop.Feedback(pb.FeedbackRequest(events=[ev]), timeout=30)

    assert "bistro patio dining set" not in [s.text for s in suggest(shop, pb, "bistro p", k=20)]
    engaged("Bistro  Patio Dining SET")
    got = suggest(shop, pb, "bistro p", k=20)
    hit = next(s for s in got if s.text == "bistro patio dining set")
    assert hit.source == "log" and hit.results > 0
    info = shop.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert info.suggest_phrases > 800 and info.suggest_live_phrases >= 1
    # A searched query stays even when no title holds its words (the engine answered it: it was clicked) ...
    engaged("xyzzy lamp")
    assert [s for s in suggest(shop, pb, "xyzzy") if s.text == "xyzzy lamp"][0].results == 0
    # ... while a phrase made up here (a completion of the last word) that matches no item is left out.
    assert not [s for s in suggest(shop, pb, "zorblax dri") if s.source == "word"]
    made_up = [s for s in suggest(shop, pb, "zorblax dri", include_zero_results=True) if s.source == "word"]
    assert made_up and made_up[0].text.startswith("zorblax dri") and made_up[0].results == 0
    engaged("shit lamp")  # a blocklisted word
    assert not [s for s in suggest(shop, pb, "shit", include_zero_results=True) if "shit" in s.text]
    assert [s for s in suggest(shop, pb, "shit", include_blocked=True, include_zero_results=True)
            if s.text == "shit lamp"]


def test_suggest_is_personalised_by_recent_behaviour(shop, pb):
    """'s' is ambiguous; a shopper who just bought lighting sees lighting suggestions ranked up."""
    plain = suggest(shop, pb, "s", k=8)
    ev = [pb.Event(event_id=uuid.uuid4().hex, user_id="lamp-fan", item_id=i, type=pb.Event.PURCHASE)
          for i in ("SR-00193", "SR-00195", "SR-00196")]
    shop.Feedback(pb.FeedbackRequest(events=ev), timeout=30)
    mine = suggest(shop, pb, "s", k=8, user_id="lamp-fan")
    lighting = lambda sug: sum(s.top_category == "Lighting" for s in sug[:4])  # noqa: E731
    assert lighting(mine) > lighting(plain)
    assert any(s.personalised for s in mine) and not any(s.personalised for s in plain)


def test_suggest_validation(shop, pb):
    cases = [({"prefix": ""}, "prefix", "empty"), ({"prefix": "x" * 101}, "prefix", "limit is 100"),
             ({"prefix": "ab\x07"}, "prefix", "control"), ({"prefix": "dr", "k": 0}, "k", "between 1 and 20"),
             ({"prefix": "dr", "k": 21}, "k", "between 1 and 20"), ({"prefix": "dr", "user_id": "u" * 300}, "user_id", "limit")]
    for kw, field, words in cases:
        err = rpc_error(shop.Suggest, pb.SuggestRequest(**kw), timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details() and words in err.details(), kw
    assert len(suggest(shop, pb, "x" * 100)) == 0  # the limit itself is fine: no suggestion, no error
    assert len(suggest(shop, pb, "c", k=20)) == 20


def test_training_suggest_gives_a_bundle_a_new_table_and_old_bundles_are_refused_clearly(sample_bundle, tmp_path, pb):
    """`python -m training suggest` re-tables a bundle (new version, verified checksums, the source untouched);
    a bundle without a table answers Suggest with FAILED_PRECONDITION naming the fix."""
    import json
    import shutil

    import pandas as pd

    from server.bundle import load_bundle
    from training.__main__ import main as training_main
    from training.bundle_writer import seal

    log = tmp_path / "log.csv"
    pd.DataFrame({"query": ["Zebra Lamp", "zebra lamp", "drill"], "count": [2, 3, 1]}).to_csv(log, index=False)
    out = tmp_path / "retabled"
    assert training_main(["suggest", "--bundle", str(sample_bundle), "--query-log", str(log), "--out", str(out)]) == 0
    new, old = load_bundle(out), load_bundle(sample_bundle)
    assert new.version != old.version and len(new.items) == len(old.items)
    row = new.suggest.set_index("text").loc["zebra lamp"]
    assert row["log_count"] == 5 and row["results"] == 0
    assert "zebra lamp" not in set(old.suggest["text"])
    assert training_main(["suggest", "--bundle", str(sample_bundle), "--query-log", str(log), "--out", str(out)]) == 2

    bare = tmp_path / "bare"
    shutil.copytree(sample_bundle, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["suggest"]
    shutil.rmtree(bare / "suggest")
    seal(bare, manifest)
    srv = ServerThread(make_config(bare)).start()
    try:
        from searchrec.v1 import searchrec_pb2_grpc as pb_grpc

        with grpc.insecure_channel(srv.target) as ch:
            err = rpc_error(pb_grpc.SearchRecommendStub(ch).Suggest, pb.SuggestRequest(prefix="dri"), timeout=30)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "training suggest" in err.details()
    finally:
        srv.stop()


def test_suggester_counts_live_phrases_only_when_it_suggests_them():
    """A Feedback of many new queries (or a long log replayed at start) costs no catalog lookups on the event loop;
    a live phrase is counted against the catalog when it is first suggested, and the most searched come first."""
    import pandas as pd

    from server.suggest import Suggester

    calls = []

    def stats(text):
        calls.append(text)
        return 3, "Lighting"

    table = pd.DataFrame({"text": ["lamp"], "log_count": [1.0], "catalog_count": [0.0], "results": [5],
                          "top_category": ["Lighting"], "blocked": [False]})
    sg = Suggester(table, {f"query {i}": 1.0 for i in range(500)}, stats)
    for i in range(500):
        sg.observe(f"new query {i}")
    sg.observe("new query 7", 5.0)
    assert calls == []
    got = sg.suggest("new q", 3)
    assert got[0].text == "new query 7" and got[0].results == 3 and got[0].source == "log"
    assert 0 < len(calls) <= 32  # the best few of the range only

