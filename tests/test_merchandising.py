"""Merchandising rules on a real server: synonyms (two-way, one-way), pins, boosts and buries by attribute,
hidden items; each shows in the explain output; rules are durable (a restart keeps them) and validated."""
from __future__ import annotations

import grpc
import pytest

from tests.conftest import ServerThread, make_config, rpc_error


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rules-state")


@pytest.fixture(scope="module")
def shop(sample_bundle, state_dir):
    srv = ServerThread(make_config(sample_bundle, state_dir=state_dir)).start()
    from searchrec.v1 import searchrec_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(srv.target)
    yield pb_grpc.SearchRecommendStub(ch), srv
    ch.close()
    srv.stop()


def ids(resp):
    return [it.item_id for it in resp.items]


def put(stub, pb, *rules):
    return stub.PutRules(pb.PutRulesRequest(rules=list(rules)), timeout=30)


def fired(resp):
    return {f.rule_id: f for f in resp.rules_fired}


def test_pin_hide_boost_bury_and_explain(shop, pb):
    stub, _ = shop
    q = "cordless drill"
    before = stub.Search(pb.SearchRequest(query=q, k=10, explain=True), timeout=30)
    base = ids(before)
    assert not before.rules_fired
    lamp = "SR-00196"  # a solar path light: not a drill result
    assert lamp not in base
    put(stub, pb,
        pb.Rule(rule_id="pin-lamp", query=q, pin=pb.Pin(item_id=lamp, position=2)),
        pb.Rule(rule_id="pin-drill", query=q, pin=pb.Pin(item_id=base[5], position=1)),
        pb.Rule(rule_id="hide-top", query=q, hide=pb.Hide(item_id=base[0])))
    resp = stub.Search(pb.SearchRequest(query=q, k=10, explain=True), timeout=30)
    got = ids(resp)
    assert got[0] == base[5] and got[1] == lamp and base[0] not in got and len(got) == 10
    f = fired(resp)
    assert set(f) == {"pin-lamp", "pin-drill", "hide-top"}
    assert f["hide-top"].kind == "hide" and base[0] in f["hide-top"].detail
    for it in resp.items:  # contributions (rules included) still sum to the score
        assert abs(sum(c.contribution for c in it.explanation) - it.score) < 1e-3
    assert any(c.name == "rule:pin-lamp" for c in resp.items[1].explanation)
    # A pinned candidate from below the top k keeps its own score and explanation (plus the rule, weighing 0).
    short = stub.Search(pb.SearchRequest(query=q, k=3, explain=True), timeout=30)
    assert ids(short)[:2] == [base[5], lamp] and len(short.items) == 3
    why = {c.name: c.contribution for c in short.items[0].explanation}
    assert why["rule:pin-drill"] == 0.0 and "dense" in why
    assert abs(sum(why.values()) - short.items[0].score) < 1e-3
    # Another query is untouched; a CONTAINS rule fires on queries that hold its words.
    assert not stub.Search(pb.SearchRequest(query="cordless drills kit", k=5, explain=True), timeout=30).rules_fired
    # Boost and bury by attribute: a brand up, out-of-stock items down, for every query.
    brand = before.items[-1].brand
    put(stub, pb, pb.Rule(rule_id="up-brand", boost=pb.Boost(field="brand", value=brand.upper(), weight=5.0)))
    up = stub.Search(pb.SearchRequest(query="drill", k=5, explain=True), timeout=30)
    assert all(it.brand == brand for it in up.items[:2])
    assert "up-brand" in fired(up) and any(c.name == "rule:up-brand" and c.contribution == 5.0
                                           for c in up.items[0].explanation)
    put(stub, pb, pb.Rule(rule_id="down-brand", query="drill", match=pb.Rule.CONTAINS,
                          boost=pb.Boost(field="brand", value=brand, weight=-10.0)))
    down = stub.Search(pb.SearchRequest(query="cordless drill", k=10, explain=True), timeout=30)
    assert brand not in [it.brand for it in down.items[:3]] and "buried" in fired(down)["down-brand"].detail
    stub.DeleteRules(pb.DeleteRulesRequest(rule_ids=["up-brand", "down-brand", "pin-lamp", "pin-drill", "hide-top"]),
                     timeout=30)
    assert ids(stub.Search(pb.SearchRequest(query=q, k=10), timeout=30)) == base


def test_boost_by_item_attribute(shop, pb):
    stub, _ = shop
    put(stub, pb, pb.Rule(rule_id="size-12v", boost=pb.Boost(field="attributes.size", value="12V", weight=20.0)))
    resp = stub.Search(pb.SearchRequest(query="drill", k=3, explain=True), timeout=30)
    assert "12v" in resp.items[0].title.lower() and "size-12v" in fired(resp)
    stub.DeleteRules(pb.DeleteRulesRequest(rule_ids=["size-12v"]), timeout=30)


def test_synonyms_two_way_and_one_way(shop, pb):
    stub, _ = shop
    put(stub, pb, pb.Rule(rule_id="syn-bulb", synonyms=pb.Synonyms(terms=["globe", "bulb"])),
        pb.Rule(rule_id="syn-mower", synonyms=pb.Synonyms(terms=["grass cutter", "mower"], one_way=True)))
    globe = stub.Search(pb.SearchRequest(query="globe", k=5, explain=True), timeout=30)
    assert "syn-bulb" in fired(globe) and "bulb" in fired(globe)["syn-bulb"].detail
    assert any("bulb" in it.title.lower() for it in globe.items)
    bulb = stub.Search(pb.SearchRequest(query="led bulb", k=5, explain=True), timeout=30)
    assert "syn-bulb" in fired(bulb)  # two-way: the other direction fires too
    cutter = stub.Search(pb.SearchRequest(query="grass cutter", k=5, explain=True), timeout=30)
    assert "syn-mower" in fired(cutter) and any("mower" in it.title.lower() for it in cutter.items)
    mower = stub.Search(pb.SearchRequest(query="lawn mower", k=5, explain=True), timeout=30)
    assert "syn-mower" not in fired(mower)  # one-way: mower does not search for grass cutter
    stub.DeleteRules(pb.DeleteRulesRequest(rule_ids=["syn-bulb", "syn-mower"]), timeout=30)


def test_pins_apply_to_relevance_lists_and_pages(shop, pb):
    stub, _ = shop
    q = "patio dining set"
    lamp = "SR-00193"
    put(stub, pb, pb.Rule(rule_id="pin-list", query=q, pin=pb.Pin(item_id=lamp, position=3)))
    walked, token = [], ""
    while True:
        page = stub.Search(pb.SearchRequest(query=q, k=2, paged=True, page_token=token), timeout=30)
        walked += ids(page)
        token = page.next_page_token
        if not token:
            break
    assert walked[2] == lamp and len(walked) == len(set(walked)) == page.total_results
    by_price = stub.Search(pb.SearchRequest(query=q, k=50, sort=pb.SortBy.Value("PRICE_ASC")), timeout=30)
    assert lamp not in ids(by_price)  # a price sort is not reordered by pins
    stub.DeleteRules(pb.DeleteRulesRequest(rule_ids=["pin-list"]), timeout=30)


def test_rules_are_durable_listed_and_validated(shop, pb, sample_bundle, state_dir):
    stub, srv = shop
    put(stub, pb, pb.Rule(rule_id="keep-me", query="Garden  HOSE", hide=pb.Hide(item_id="SR-00001")))
    listed = stub.ListRules(pb.ListRulesRequest(), timeout=30).rules
    assert [r.rule_id for r in listed] == ["keep-me"] and listed[0].query == "garden hose"
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).rules == 1
    cases = [
        (pb.Rule(rule_id="", hide=pb.Hide(item_id="SR-00001")), "rules[0].rule_id", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x"), "rules[0]", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", query="q", pin=pb.Pin(item_id="NOPE", position=1)), "rules[0].pin.item_id",
         grpc.StatusCode.NOT_FOUND),
        (pb.Rule(rule_id="x", query="q", pin=pb.Pin(item_id="SR-00001", position=0)), "rules[0].pin.position",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", pin=pb.Pin(item_id="SR-00001", position=1)), "rules[0].query",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", boost=pb.Boost(field="colour", value="red", weight=1)), "rules[0].boost.field",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", boost=pb.Boost(field="brand", value="Acme", weight=0)), "rules[0].boost.weight",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", boost=pb.Boost(field="brand", value="Acme", weight=float("nan"))),
         "rules[0].boost.weight", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", boost=pb.Boost(field="in_stock", value="maybe", weight=1)), "rules[0].boost.value",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", synonyms=pb.Synonyms(terms=["one"])), "rules[0].synonyms.terms",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", query="q", synonyms=pb.Synonyms(terms=["a", "b"])), "rules[0].query",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Rule(rule_id="x", synonyms=pb.Synonyms(terms=["Sofa", "sofa"])), "rules[0].synonyms.terms[1]",
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for rule, field, code in cases:
        err = rpc_error(stub.PutRules, pb.PutRulesRequest(rules=[pb.Rule(rule_id="fine", hide=pb.Hide(item_id="SR-00002")),
                                                                 rule]), timeout=30)
        assert err.code() == code and field.split("[0]")[0] in err.details(), (rule, err.details())
    # Nothing of a refused request was stored (the valid first rule neither).
    assert [r.rule_id for r in stub.ListRules(pb.ListRulesRequest(), timeout=30).rules] == ["keep-me"]
    err = rpc_error(stub.DeleteRules, pb.DeleteRulesRequest(rule_ids=["keep-me", "nope"]), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "rule_ids[1]" in err.details()
    # A restart replays the rules from the log.
    srv.stop()
    again = ServerThread(make_config(sample_bundle, state_dir=state_dir)).start()
    try:
        from searchrec.v1 import searchrec_pb2_grpc as pb_grpc

        with grpc.insecure_channel(again.target) as ch:
            s2 = pb_grpc.SearchRecommendStub(ch)
            assert [r.rule_id for r in s2.ListRules(pb.ListRulesRequest(), timeout=30).rules] == ["keep-me"]
            resp = s2.Search(pb.SearchRequest(query="garden hose", k=50, explain=True), timeout=30)
            assert "SR-00001" not in ids(resp)
    finally:
        again.stop()


def test_rules_need_a_state_store(server, stub, pb):
    err = rpc_error(stub.PutRules, pb.PutRulesRequest(rules=[pb.Rule(rule_id="x", hide=pb.Hide(item_id="SR-00001"))]),
                    timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "state" in err.details()
