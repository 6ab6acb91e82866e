"""Locust: an ads-heavy mix. Sponsored slots in every Search, SimilarItems and Recommend, impressions and clicks
reported with their auction ids, advertisers reading their reports, while checking what ads must keep true.

    locust -f loadtest/ads_locustfile.py --headless -u 16 -r 8 -t 60s --host 127.0.0.1:50051

The server needs a state store (--state-dir or --state). At the start the load test puts SEARCHREC_ADS_CAMPAIGNS
campaigns (default 20) over random items of the bundle (half with keywords drawn from the queries, half
automatic), with budgets large enough to last the run. Each simulated shopper runs the ordinary mix of
loadtest/locustfile.py (its tasks are inherited) plus Search, SimilarItems and Recommend tasks that check the
sponsored slots, report every ad shown as an impression and click one in ten; an advertiser user reads AdsReport and ListCampaigns. Violations are reported as failures named after
the rule: "ads-dedup" (a sponsored item also among the organic items), "ads-price" (a cpc above the bid or below
the reserve), "ads-double-charge" (a click charged twice: each click is sent twice, the second time as a retry).
SEARCHREC_ADS_TOKEN: a token with the ads role (default SEARCHREC_TOKEN).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loadtest.locustfile as base  # noqa: E402  # gevent set up, the ordinary tasks, the interceptor

import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import grpc  # noqa: E402
from locust import between, events, task  # noqa: E402

pb = base.pb
CAMPAIGNS = int(os.environ.get("SEARCHREC_ADS_CAMPAIGNS", "20"))
RESERVE = float(os.environ.get("SEARCHREC_ADS_RESERVE", "0.05"))
bids: dict[str, float] = {}


@events.test_start.add_listener
def _campaigns(environment, **_kw) -> None:
    """Put the run's campaigns (once per run, before the users start)."""
    host = (environment.host or "127.0.0.1:50051").replace("grpc://", "")
    token = os.environ.get("SEARCHREC_ADS_TOKEN") or os.environ.get("SEARCHREC_TOKEN")
    rng = random.Random(int(os.environ.get("SEARCHREC_ADS_SEED", "0")))
    run = uuid.uuid4().hex[:6]
    campaigns = []
    for n in range(CAMPAIGNS):
        c = pb.Campaign(campaign_id=f"load-{run}-{n}", advertiser=f"load-adv-{n % 5}",
                        item_ids=rng.sample(base.ITEMS, min(8, len(base.ITEMS))),
                        max_cpc=round(rng.uniform(0.2, 2.0), 2), daily_budget=100_000.0, frequency_cap=50)
        if n % 2 == 0:
            for q in rng.sample(base.QUERIES, min(3, len(base.QUERIES))):
                c.keywords.add(text=q, match=pb.Keyword.BROAD)
        bids[c.campaign_id] = c.max_cpc
        campaigns.append(c)
    with base.open_channel(host, token, os.environ.get("SEARCHREC_TLS_CA")) as channel:
        base.pb_grpc.SearchRecommendStub(channel).PutCampaigns(pb.PutCampaignsRequest(campaigns=campaigns), timeout=30)


class AdsUser(base.SearchrecUser):
    wait_time = between(0.0, 0.05)

    def _violation(self, name: str, message: str) -> None:
        self.environment.events.request.fire(request_type="check", name=name, response_time=0, response_length=0,
                                             exception=AssertionError(message), context={})

    def _ads(self, resp, query: str = "") -> None:
        """Check the sponsored slots of one answer, report their impressions and click one in ten."""
        organic = {it.item_id for it in resp.items}
        events_ = []
        clicks = []
        for s in resp.sponsored:
            if s.item.item_id in organic:
                self._violation("ads-dedup", f"{s.item.item_id} is both sponsored and organic")
            bid = bids.get(s.campaign_id)
            if bid is not None and not (RESERVE - 1e-9 <= s.cpc <= bid + 1e-9):
                self._violation("ads-price", f"cpc {s.cpc} outside [{RESERVE}, {bid}] for {s.campaign_id}")
            events_.append(pb.Event(event_id=uuid.uuid4().hex, user_id=self.user_id, item_id=s.item.item_id,
                                    type=pb.Event.VIEW, auction_id=s.auction_id, timestamp_ms=int(time.time() * 1000)))
            if random.random() < 0.1:
                clicks.append(pb.Event(event_id=uuid.uuid4().hex, user_id=self.user_id, item_id=s.item.item_id,
                                       type=pb.Event.CLICK, auction_id=s.auction_id, query=query,
                                       timestamp_ms=int(time.time() * 1000)))
        if events_:
            self._call(self.stub.Feedback, pb.FeedbackRequest(events=events_))
        for click in clicks:
            try:
                first = self.stub.Feedback(pb.FeedbackRequest(events=[click]), timeout=base.DEADLINE_S)
                again = self.stub.Feedback(pb.FeedbackRequest(events=[click]), timeout=base.DEADLINE_S)
            except grpc.RpcError:
                continue  # reported by the interceptor
            if first.charged + again.charged > 1:
                self._violation("ads-double-charge", f"auction charged {first.charged + again.charged} times")

    @task(60)
    def search_with_ads(self) -> None:
        query = random.choice(base.QUERIES)
        try:
            resp = self.stub.Search(pb.SearchRequest(query=query, k=10, user_id=self.user_id), timeout=base.DEADLINE_S)
        except grpc.RpcError:
            return
        self._ads(resp, query)

    @task(15)
    def similar_with_ads(self) -> None:
        try:
            resp = self.stub.SimilarItems(pb.SimilarItemsRequest(item_id=random.choice(base.ITEMS), k=10,
                                                                 user_id=self.user_id),
                                          timeout=base.DEADLINE_S)
        except grpc.RpcError:
            return
        self._ads(resp)

    @task(10)
    def recommend_with_ads(self) -> None:
        if not base.USERS:
            return
        try:
            resp = self.stub.Recommend(pb.RecommendRequest(user_id=self.user_id, k=10), timeout=base.DEADLINE_S)
        except grpc.RpcError:
            return
        self._ads(resp)

    @task(3)
    def advertiser_report(self) -> None:
        self._call(self.stub.AdsReport, pb.AdsReportRequest(advertiser=f"load-adv-{random.randrange(5)}"))
        self._call(self.stub.ListCampaigns, pb.ListCampaignsRequest())

