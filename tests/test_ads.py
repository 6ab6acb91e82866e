"""Sponsored products: the auction's prices (second price, reserve, ties), targeting, pacing, the ledger's
billing rule, and on a real server: campaigns and every validation error, sponsored slots beside organic results
(relevance floor, de-duplication, off switch), idempotent billing through Feedback that survives a restart,
budgets, frequency caps and advertiser-scoped tokens."""
from __future__ import annotations

import json
import time

import grpc
import pytest

from server.ads.auction import Bid, run_auction
from server.ads.campaigns import CampaignSet, state
from server.ads.ledger import DayClock, Ledger
from server.state import CLICK, VIEW, Event, LiveState
from tests.conftest import ServerThread, make_config, rpc_error

DRILL = "cordless drill"
LAMP = "SR-00196"  # a solar path light: never relevant to a drill query


def bid(cid: str, value_bid: float, pctr: float = 0.1, quality: float = 1.0, row: int | None = None,
        relevance: float = 1.0) -> Bid:
    return Bid(cid, "adv", row if row is not None else hash(cid) % 10_000, cid, value_bid, pctr, quality, relevance)


# --- the auction ---------------------------------------------------------------------------------

def test_second_price_is_the_least_bid_that_keeps_the_slot_and_never_above_the_bid():
    bids = [bid("a", 2.00, pctr=0.10), bid("b", 1.00, pctr=0.15), bid("c", 0.50, pctr=0.10, quality=0.5)]
    wins = run_auction(bids, 2, reserve=0.05)
    assert [w.bid.campaign_id for w in wins] == ["a", "b"]  # values 0.2, 0.15, 0.025
    a, b = wins
    assert a.price == pytest.approx(1.50)  # 0.15 / (0.10 x 1.0)
    assert b.price == pytest.approx(0.17)  # 0.025 / 0.15 = 0.1667, rounded up to the cent
    assert all(w.price <= w.bid.bid for w in wins)
    assert [w.slot for w in wins] == [1, 2]


def test_reserve_price_floors_prices_and_excludes_low_bids():
    wins = run_auction([bid("a", 1.0), bid("low", 0.04)], 2, reserve=0.05)
    assert [w.bid.campaign_id for w in wins] == ["a"]  # the bid under the reserve never serves
    assert wins[0].price == pytest.approx(0.05)  # alone: it pays the reserve
    # A next bid whose value would price below the reserve still leaves the reserve.
    wins = run_auction([bid("a", 1.0), bid("b", 0.06, pctr=0.01)], 1, reserve=0.30)
    assert wins[0].price == pytest.approx(0.30)


def test_ties_pay_their_own_bid_and_the_tiebreak_is_fair_over_auctions():
    firsts = set()
    for n in range(40):
        wins = run_auction([bid("x", 1.0), bid("y", 1.0)], 1, reserve=0.05, auction=f"auction-{n}")
        assert wins[0].price == pytest.approx(1.0)  # the next value equals its own: it pays its bid
        firsts.add(wins[0].bid.campaign_id)
    assert firsts == {"x", "y"}  # neither campaign always wins a tie


def test_one_slot_per_campaign_and_per_item_and_other_mechanisms():
    bids = [bid("a", 2.0, row=1), bid("a", 1.9, row=2), bid("b", 1.0, row=1), bid("c", 0.5, row=3, relevance=9.0)]
    wins = run_auction(bids, 3, reserve=0.05)
    assert [(w.bid.campaign_id, w.bid.row) for w in wins] == [("a", 1), ("c", 3)]
    first = run_auction(bids, 3, reserve=0.05, mechanism="first_price")
    assert [w.price for w in first] == [2.0, 0.5]
    rel = run_auction(bids, 1, reserve=0.05, mechanism="relevance")
    assert rel[0].bid.campaign_id == "c" and rel[0].price == 0.5


# --- targeting and pacing ------------------------------------------------------------------------

def campaign(cid: str, **kw) -> dict:
    c = {"campaign_id": cid, "advertiser": "adv", "item_ids": ["SR-00001"], "max_cpc": 1.0, "daily_budget": 10.0,
         "total_budget": 0.0, "start_ms": 0, "end_ms": 0, "status": "active", "keywords": [], "negative_keywords": [],
         "categories": [], "audience_min_interest": 0.0, "frequency_cap": 0, "created_ms": 0, "updated_ms": 0}
    c.update(kw)
    return c


def test_keyword_match_types_and_negative_keywords():
    cs = CampaignSet({c["campaign_id"]: c for c in [
        campaign("exact", keywords=[["cordless drill", "exact"]]),
        campaign("phrase", keywords=[["cordless drill", "phrase"]]),
        campaign("broad", keywords=[["drill cordless", "broad"]]),
        campaign("auto"),
        campaign("neg", keywords=[["drill", "broad"]], negative_keywords=["toy"]),
    ]})
    assert set(cs.matching("Cordless Drill")) == {"exact", "phrase", "broad", "auto", "neg"}
    assert set(cs.matching("cordless drill kit")) == {"phrase", "broad", "auto", "neg"}
    assert set(cs.matching("drill for cordless")) == {"broad", "auto", "neg"}
    assert set(cs.matching("toy drill")) == {"auto"}
    assert set(cs.matching("garden hose")) == {"auto"}


def test_status_dates_budgets_and_pacing():
    clock = DayClock(86400)
    day0 = 20_000 * 86_400_000  # midnight of day 20000
    c = campaign("c", daily_budget=24.0)
    ledger = Ledger({"c": c}.get, clock)
    at = lambda hour: day0 + int(hour * 3_600_000)  # noqa: E731
    assert state(c, at(1), ledger, clock, True, 1 / 24) == "serving"
    ledger.row("c", 20_000)[3] = 4.0  # spent 4 of 24 by 01:00: the pace allows 24 x (1/24 + 1/24) = 2
    assert state(c, at(1), ledger, clock, True, 1 / 24) == "paced"
    assert state(c, at(3.5), ledger, clock, True, 1 / 24) == "serving"  # allowance 4.5 by 03:30
    assert state(c, at(1), ledger, clock, False, 1 / 24) == "serving"  # without pacing: as fast as it sells
    ledger.row("c", 20_000)[3] = 24.0
    assert state(c, at(23), ledger, clock, True, 1 / 24) == "daily budget spent"
    assert state(c, at(24 + 1), ledger, clock, True, 1 / 24) == "serving"  # a new day, a new budget
    assert state(campaign("p", status="paused"), at(1), ledger, clock, True, 0.04) == "paused"
    assert state(campaign("s", start_ms=at(5)), at(1), ledger, clock, True, 0.04) == "scheduled"
    assert state(campaign("e", end_ms=at(1)), at(2), ledger, clock, True, 0.04) == "ended"


def test_ledger_charges_once_per_auction_and_stops_at_the_budget(tmp_path):
    live = LiveState(tmp_path / "state", fsync=False)
    live.record_campaigns([campaign("c", daily_budget=1.0)])
    now = int(time.time() * 1000)
    day = live.ads.clock.day(now)
    events = []
    for n in range(5):  # five auctions at 0.40, each clicked twice (two event ids)
        events += [Event(f"v{n}", "u", "SR-00001", VIEW, now, auction_id=f"a{n}", ad=("c", 0.4, day, 1)),
                   Event(f"k{n}", "u", "SR-00001", CLICK, now, auction_id=f"a{n}", ad=("c", 0.4, day, 1)),
                   Event(f"k{n}b", "u", "SR-00001", CLICK, now, auction_id=f"a{n}", ad=("c", 0.4, day, 1))]
    live.record_events(events)
    row = live.ads.rows["c"][day]
    # 0.4 + 0.4 < 1.0, the third click brings it to 1.2 (one click over at most), then nothing more
    assert row[2] == 3 and row[3] == pytest.approx(1.2) and row[1] == 5
    assert row[4] == 4  # the clicks (two each) of the two auctions after the budget ran out: unbilled
    live.close()
    again = LiveState(tmp_path / "state", fsync=False)  # the log replays to the same figures
    assert again.ads.rows["c"][day] == row
    again.close()


# --- on a real server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shop(sample_bundle, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("ads-state")
    # Pacing off: a test spends a daily budget in seconds (pacing is tested above, with a clock of its own).
    srv = ServerThread(make_config(sample_bundle, state_dir=state_dir, fsync=False, ads_pacing=False)).start()
    from server.stubs import pb_grpc

    ch = grpc.insecure_channel(srv.target)
    yield pb_grpc.SearchRecommendStub(ch), srv, state_dir
    ch.close()
    srv.stop()


def organic(stub, pb, query=DRILL, k=10):
    return [it.item_id for it in stub.Search(pb.SearchRequest(query=query, k=k, ad_slots=0), timeout=30).items]


def put(stub, pb, *campaigns, metadata=None):
    return stub.PutCampaigns(pb.PutCampaignsRequest(campaigns=list(campaigns)), timeout=30, metadata=metadata)


def pause_all(stub, pb):
    for c in stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns:
        stub.SetCampaignStatus(pb.SetCampaignStatusRequest(campaign_id=c.campaign_id, status=pb.PAUSED), timeout=30)


def test_campaign_validation_errors_name_the_field_and_store_nothing(shop, pb):
    stub, _, _ = shop
    ok = dict(campaign_id="v1", advertiser="acme", item_ids=["SR-00001"], max_cpc=0.5, daily_budget=5.0)
    cases = [
        (dict(max_cpc=-1.0), "campaigns[1].max_cpc", ">= 0"),
        (dict(max_cpc=0.01), "campaigns[1].max_cpc", "reserve price"),
        (dict(daily_budget=0.2), "campaigns[1].daily_budget", "one click"),
        (dict(total_budget=1.0), "campaigns[1].total_budget", "daily_budget"),
        (dict(start_ms=2_000_000_000_000, end_ms=1_900_000_000_000), "campaigns[1].end_ms", "after start_ms"),
        (dict(item_ids=["NOPE"]), "campaigns[1].item_ids[0]", "not in the catalog"),
        (dict(item_ids=[]), "campaigns[1].item_ids", "1..100"),
        (dict(campaign_id=""), "campaigns[1].campaign_id", "empty"),
        (dict(advertiser=""), "campaigns[1].advertiser", "empty"),
        (dict(audience_min_interest=1.5), "campaigns[1].audience_min_interest", "[0, 1]"),
        (dict(frequency_cap=-1), "campaigns[1].frequency_cap", "0..1000"),
        (dict(keywords=[pb.Keyword(text="  ")]), "campaigns[1].keywords[0].text", "empty"),
        (dict(max_cpc=float("nan")), "campaigns[1].max_cpc", "finite"),
    ]
    for change, field, words in cases:
        err = rpc_error(put, stub, pb, pb.Campaign(**{**ok, "campaign_id": "fine"}), pb.Campaign(**{**ok, **change}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, err.details())
        assert field in err.details() and words in err.details(), (change, err.details())
    assert not [c for c in stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns
                if c.campaign_id == "fine"]  # nothing of a refused request was stored
    err = rpc_error(stub.Search, pb.SearchRequest(query=DRILL, ad_slots=6), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ad_slots" in err.details()
    bad = pb.Event(event_id="x", user_id="u", item_id="SR-00001", type=pb.Event.CLICK, auction_id="forged.token")
    err = rpc_error(stub.Feedback, pb.FeedbackRequest(events=[bad]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "events[0].auction_id" in err.details()


def test_sponsored_slots_pass_the_relevance_floor_and_leave_the_organic_list(shop, pb):
    stub, _, _ = shop
    pause_all(stub, pb)
    base = organic(stub, pb)
    put(stub, pb,
        pb.Campaign(campaign_id="drills", advertiser="acme", item_ids=base[3:6], max_cpc=0.8, daily_budget=50,
                    keywords=[pb.Keyword(text="drill", match=pb.Keyword.BROAD)]),
        pb.Campaign(campaign_id="lamp", advertiser="glow", item_ids=[LAMP], max_cpc=5.0, daily_budget=50),
        pb.Campaign(campaign_id="neg", advertiser="acme2", item_ids=base[6:8], max_cpc=0.9, daily_budget=50,
                    negative_keywords=["cordless"]))
    resp = stub.Search(pb.SearchRequest(query=DRILL, k=10), timeout=30)
    ads = resp.sponsored
    assert [a.slot for a in ads] == list(range(1, len(ads) + 1)) and len(ads) >= 1
    assert {a.campaign_id for a in ads} == {"drills"}  # the lamp is not relevant; "neg" excludes cordless
    organic_ids = [it.item_id for it in resp.items]
    assert len(organic_ids) == 10 and not {a.item.item_id for a in ads} & set(organic_ids)  # no item twice
    for a in ads:
        assert a.item.item_id in base[3:6] and a.advertiser == "acme" and 0.05 <= a.cpc <= 0.8 and a.auction_id
    # The lamp is refused by the floor however high its bid; an ad-less request stays organic.
    assert not stub.Search(pb.SearchRequest(query=DRILL, k=10, ad_slots=0), timeout=30).sponsored
    assert [s.campaign_id for s in stub.Search(pb.SearchRequest(query="solar path light", k=10), timeout=30).sponsored
            if s.campaign_id == "lamp"] == ["lamp"]  # ... and shown where it is relevant
    # Paused: not served.
    stub.SetCampaignStatus(pb.SetCampaignStatusRequest(campaign_id="drills", status=pb.PAUSED), timeout=30)
    assert not [a for a in stub.Search(pb.SearchRequest(query=DRILL), timeout=30).sponsored if a.campaign_id == "drills"]
    listed = {c.campaign_id: c for c in stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns}
    assert listed["drills"].state.serving == "paused" and listed["lamp"].state.serving == "serving"
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).campaigns == len(listed)
    # SimilarItems and Recommend carry ads too (their own relevance floor: nearness to the item / the user).
    put(stub, pb, pb.Campaign(campaign_id="drills", advertiser="acme", item_ids=base[3:6], max_cpc=0.8,
                              daily_budget=50))
    sim = stub.SimilarItems(pb.SimilarItemsRequest(item_id=base[0], k=5), timeout=30)
    assert sim.sponsored and not {a.item.item_id for a in sim.sponsored} & {it.item_id for it in sim.items}
    assert LAMP not in {a.item.item_id for a in sim.sponsored}
    rec = stub.Recommend(pb.RecommendRequest(user_id="ads-u", recent_item_ids=base[:2], k=5), timeout=30)
    assert rec.sponsored and all(a.item.item_id not in base[:2] for a in rec.sponsored)
    assert not {a.item.item_id for a in rec.sponsored} & {it.item_id for it in rec.items}
    pause_all(stub, pb)


def test_ads_keep_merchandising_pins_in_place(shop, pb):
    stub, _, _ = shop
    pause_all(stub, pb)
    base = organic(stub, pb)
    stub.PutRules(pb.PutRulesRequest(rules=[pb.Rule(rule_id="ads-pin", query=DRILL,
                                                    pin=pb.Pin(item_id=base[6], position=3))]), timeout=30)
    try:
        put(stub, pb, pb.Campaign(campaign_id="tops", advertiser="acme", item_ids=base[:2] + [base[6]], max_cpc=0.9,
                                  daily_budget=50))
        resp = stub.Search(pb.SearchRequest(query=DRILL, k=10, user_id="pin-user"), timeout=30)
        assert resp.sponsored and base[6] not in {a.item.item_id for a in resp.sponsored}  # the merchant's pin
        assert [it.item_id for it in resp.items][2] == base[6]  # still third, with an ad item gone from above it
    finally:
        stub.DeleteRules(pb.DeleteRulesRequest(rule_ids=["ads-pin"]), timeout=30)
        pause_all(stub, pb)


def test_category_and_audience_targeting(shop, pb):
    stub, _, _ = shop
    pause_all(stub, pb)
    base = organic(stub, pb)
    put(stub, pb,
        pb.Campaign(campaign_id="garden-only", advertiser="acme", item_ids=base[2:5], max_cpc=0.9, daily_budget=50,
                    categories=["Garden"]),
        pb.Campaign(campaign_id="tools-only", advertiser="bolt", item_ids=base[5:8], max_cpc=0.5, daily_budget=50,
                    categories=["power tools"]),
        pb.Campaign(campaign_id="drill-fans", advertiser="cord", item_ids=base[8:10], max_cpc=0.7, daily_budget=50,
                    audience_min_interest=0.6))
    got = {a.campaign_id for a in stub.Search(pb.SearchRequest(query=DRILL, user_id="new-shopper"), timeout=30).sponsored}
    assert got == {"tools-only"}  # the drill answer's category is Power Tools; a user with no history has no interest
    stub.Feedback(pb.FeedbackRequest(events=[pb.Event(event_id=f"fan-{i}", user_id="fan", item_id=item, type=pb.Event.VIEW)
                                             for i, item in enumerate(base[:3])]), timeout=30)
    got = {a.campaign_id for a in stub.Search(pb.SearchRequest(query=DRILL, user_id="fan"), timeout=30).sponsored}
    assert "drill-fans" in got and "garden-only" not in got  # a user who looked at drills is in the audience
    pause_all(stub, pb)


def click_and_view(pb, ad, n: str, user: str = "buyer"):
    return [pb.Event(event_id=f"v-{n}", user_id=user, item_id=ad.item.item_id, type=pb.Event.VIEW,
                     auction_id=ad.auction_id),
            pb.Event(event_id=f"c-{n}", user_id=user, item_id=ad.item.item_id, type=pb.Event.CLICK,
                     auction_id=ad.auction_id)]


def test_clicks_are_charged_once_within_budget_and_survive_a_restart(shop, sample_bundle, pb):
    stub, srv, state_dir = shop
    pause_all(stub, pb)
    base = organic(stub, pb)
    put(stub, pb, pb.Campaign(campaign_id="budget", advertiser="acme", item_ids=base[2:5], max_cpc=0.6,
                              daily_budget=1.0, keywords=[pb.Keyword(text="drill")]))
    ad = stub.Search(pb.SearchRequest(query=DRILL, user_id="buyer"), timeout=30).sponsored[0]
    other = pb.Event(event_id="c-other", user_id="buyer", item_id=base[7], type=pb.Event.CLICK, auction_id=ad.auction_id)
    err = rpc_error(stub.Feedback, pb.FeedbackRequest(events=[other]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sold item" in err.details()
    first = stub.Feedback(pb.FeedbackRequest(events=click_and_view(pb, ad, "1")), timeout=30)
    assert first.accepted == 2 and first.charged == 1
    again = stub.Feedback(pb.FeedbackRequest(events=click_and_view(pb, ad, "1")), timeout=30)  # a retry
    assert again.duplicates == 2 and again.charged == 0
    double = pb.Event(event_id="c-1-double", user_id="buyer", item_id=ad.item.item_id, type=pb.Event.CLICK,
                      auction_id=ad.auction_id)
    assert stub.Feedback(pb.FeedbackRequest(events=[double]), timeout=30).charged == 0  # one charge per auction
    spent, prices, n = ad.cpc, [ad.cpc], 2
    while True:  # click every ad until the campaign stops serving
        ads = [a for a in stub.Search(pb.SearchRequest(query=DRILL, user_id="buyer"), timeout=30).sponsored
               if a.campaign_id == "budget"]
        if not ads:
            break
        r = stub.Feedback(pb.FeedbackRequest(events=click_and_view(pb, ads[0], str(n))), timeout=30)
        spent += ads[0].cpc * r.charged
        prices.append(ads[0].cpc)
        n += 1
        assert n < 50
    assert 1.0 <= spent < 1.0 + max(prices)  # stopped, at most one click's price over
    report = stub.AdsReport(pb.AdsReportRequest(campaign_ids=["budget"]), timeout=30).rows
    assert len(report) == 1 and report[0].spend == pytest.approx(spent) and report[0].clicks == n - 1
    assert report[0].impressions == n - 1 and report[0].ctr == pytest.approx(1.0)
    assert report[0].avg_cpc == pytest.approx(spent / (n - 1))
    state = {c.campaign_id: c.state for c in stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns}
    assert state["budget"].serving == "daily budget spent" and state["budget"].spent_today == pytest.approx(spent)
    # A restart replays the log to the same spend.
    srv.stop()
    srv2 = ServerThread(make_config(sample_bundle, state_dir=state_dir, fsync=False, ads_pacing=False)).start()
    try:
        from server.stubs import pb_grpc

        with grpc.insecure_channel(srv2.target) as ch:
            stub2 = pb_grpc.SearchRecommendStub(ch)
            rows = stub2.AdsReport(pb.AdsReportRequest(campaign_ids=["budget"]), timeout=30).rows
            assert rows[0].spend == pytest.approx(spent) and rows[0].clicks == n - 1
            # The auction id key is kept with the state: a click on an ad served before the restart still counts.
            assert stub2.Feedback(pb.FeedbackRequest(events=[pb.Event(
                event_id="after-restart", user_id="buyer", item_id=ad.item.item_id, type=pb.Event.VIEW,
                auction_id=ad.auction_id)]), timeout=30).accepted == 1
    finally:
        srv2.stop()


def test_frequency_cap_and_the_off_switch(sample_bundle, tmp_path, pb):
    srv = ServerThread(make_config(sample_bundle, state_dir=tmp_path / "s", fsync=False)).start()
    try:
        from server.stubs import pb_grpc

        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            base = organic(stub, pb)
            put(stub, pb, pb.Campaign(campaign_id="capped", advertiser="acme", item_ids=base[1:4], max_cpc=0.5,
                                      daily_budget=100, frequency_cap=2))
            seen = [len(stub.Search(pb.SearchRequest(query=DRILL, user_id="fc"), timeout=30).sponsored) for _ in range(4)]
            assert seen == [1, 1, 0, 0]  # two ads of the campaign a day for this user, then none
            sim = stub.SimilarItems(pb.SimilarItemsRequest(item_id=base[0], user_id="fc"), timeout=30)
            assert not [a for a in sim.sponsored if a.campaign_id == "capped"]  # the cap holds on every read RPC
            assert stub.Search(pb.SearchRequest(query=DRILL, user_id="someone-else"), timeout=30).sponsored
            rows = stub.AdsReport(pb.AdsReportRequest(), timeout=30).rows
            assert rows[0].served == 3
    finally:
        srv.stop()
    srv = ServerThread(make_config(sample_bundle, state_dir=tmp_path / "s", fsync=False, ads_slots=0)).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            assert not stub.Search(pb.SearchRequest(query=DRILL, user_id="x"), timeout=30).sponsored  # --ads-slots 0
            assert stub.Search(pb.SearchRequest(query=DRILL, user_id="x", ad_slots=1), timeout=30).sponsored
    finally:
        srv.stop()


def test_pacing_throttles_a_campaign_that_runs_ahead_of_the_day(sample_bundle, tmp_path, pb):
    """A (ten-day) budget day that starts now, 9% look-ahead: a budget of 10 may spend 0.9 before the clock moves
    (it moves 0.001% a minute); clicks at the reserve of 0.5 stop it after two, as "paced" (the day's budget is not
    spent: 1.0 of 10)."""
    now_ms = int(time.time() * 1000)
    srv = ServerThread(make_config(sample_bundle, state_dir=tmp_path / "s", fsync=False, ads_day_s=864_000.0,
                                   ads_day_start_ms=now_ms, ads_pacing_lookahead=0.09, ads_reserve_cpc=0.5)).start()
    try:
        from server.stubs import pb_grpc

        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            base = organic(stub, pb)
            put(stub, pb, pb.Campaign(campaign_id="paced", advertiser="acme", item_ids=base[1:4], max_cpc=1.0,
                                      daily_budget=10.0))
            charged = 0
            for n in range(10):
                ads = stub.Search(pb.SearchRequest(query=DRILL, user_id=f"p{n}"), timeout=30).sponsored
                if not ads:
                    break
                charged += stub.Feedback(pb.FeedbackRequest(events=click_and_view(pb, ads[0], f"p{n}", f"p{n}")),
                                         timeout=30).charged
            assert charged == 2
            state = stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns[0].state
            assert state.serving == "paced" and state.spent_today == pytest.approx(1.0)
            assert stub.AdsReport(pb.AdsReportRequest(), timeout=30).rows[0].day == "day-0"
    finally:
        srv.stop()


def test_an_advertiser_token_reaches_its_own_campaigns_only(sample_bundle, tmp_path, pb):
    (tmp_path / "tokens.json").write_text(json.dumps({"callers": [
        {"name": "acme-ads", "token": "t-acme", "roles": ["ads"], "advertiser": "acme"},
        {"name": "ad-ops", "token": "t-ops", "roles": ["ads", "read", "write"]},
        {"name": "shop", "token": "t-read", "roles": ["read"]}]}))
    srv = ServerThread(make_config(sample_bundle, state_dir=tmp_path / "s", fsync=False,
                                   tokens=tmp_path / "tokens.json")).start()
    acme, ops, shop = ([("authorization", f"Bearer {t}")] for t in ("t-acme", "t-ops", "t-read"))
    try:
        from server.stubs import pb_grpc

        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            mine = pb.Campaign(campaign_id="a1", advertiser="acme", item_ids=["SR-00001"], max_cpc=0.5, daily_budget=5)
            theirs = pb.Campaign(campaign_id="b1", advertiser="bolt", item_ids=["SR-00002"], max_cpc=0.5, daily_budget=5)
            assert put(stub, pb, mine, metadata=acme).put == 1
            assert put(stub, pb, theirs, metadata=ops).put == 1
            err = rpc_error(put, stub, pb, theirs, metadata=acme)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "campaigns[0].advertiser" in err.details()
            hijack = pb.Campaign(campaign_id="b1", advertiser="acme", item_ids=["SR-00002"], max_cpc=0.5, daily_budget=5)
            assert rpc_error(put, stub, pb, hijack, metadata=acme).code() == grpc.StatusCode.PERMISSION_DENIED
            listed = stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30, metadata=acme).campaigns
            assert [c.campaign_id for c in listed] == ["a1"]
            assert len(stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30, metadata=ops).campaigns) == 2
            for call, req in ((stub.AdsReport, pb.AdsReportRequest(campaign_ids=["b1"])),
                              (stub.SetCampaignStatus, pb.SetCampaignStatusRequest(campaign_id="b1", status=pb.PAUSED)),
                              (stub.ListCampaigns, pb.ListCampaignsRequest(advertiser="bolt"))):
                assert rpc_error(call, req, timeout=30, metadata=acme).code() == grpc.StatusCode.PERMISSION_DENIED
            assert rpc_error(put, stub, pb, mine, metadata=shop).code() == grpc.StatusCode.PERMISSION_DENIED
            err = rpc_error(stub.AdsReport, pb.AdsReportRequest(from_day="yesterday"), timeout=30, metadata=ops)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "from_day" in err.details()
    finally:
        srv.stop()


def test_no_state_store_no_ads(sample_bundle, pb):
    srv = ServerThread(make_config(sample_bundle)).start()
    try:
        from server.stubs import pb_grpc

        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            c = pb.Campaign(campaign_id="a1", advertiser="acme", item_ids=["SR-00001"], max_cpc=0.5, daily_budget=5)
            err = rpc_error(put, stub, pb, c)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "state" in err.details()
            assert not stub.Search(pb.SearchRequest(query=DRILL), timeout=30).sponsored
    finally:
        srv.stop()


def test_auction_ids_are_signed_with_the_state_key(tmp_path):
    from server.ads.tokens import AuctionTokens, Sold

    t = AuctionTokens(b"k" * 32)
    token = t.issue(Sold("c|1", "item|x", 0.37, 5, 10, 2))
    assert t.read(token) == Sold("c|1", "item|x", 0.37, 5, 10, 2)
    body, mac = token.split(".")
    with pytest.raises(ValueError, match="signature"):
        AuctionTokens(b"o" * 32).read(token)
    import base64

    forged = base64.urlsafe_b64encode(base64.urlsafe_b64decode(body + "==").replace(b"0.37", b"0.01")).rstrip(b"=")
    with pytest.raises(ValueError, match="signature"):
        t.read(forged.decode() + "." + mac)
    with pytest.raises(ValueError):
        t.read("nonsense")

