"""Sponsored products over a simulated day on Home Depot, served: revenue, relevance of ad slots against organic
slots, budgets, pacing, caps, double charges and the latency ads add to Search.

    python bench/ads_sim.py [--bundle DIR] [--json OUT] [--searches 3000] [--day-s 120] [--seed 0]

Without --bundle it uses bundles/homedepot-suggest (built first if missing, as bench/suggest_eval.py does: about
10 minutes on 2 cores). Everything goes through a real server (`python -m server`, its own state dir), one per
mechanism, each fed the same seeded day:

- traffic: --searches requests over a day of --day-s seconds (the server's budget day: --ads-day-s, starting when
  the traffic does), denser in the afternoon than at night (1 + 0.6 sin); 85% Search (k 10, the server's 2 ad
  slots), 15% SimilarItems of an item the user clicked before; --users users, each with five home queries they
  search 60% of the time, else a query from a pool of 400 Home Depot judged queries with Zipf popularity;
- campaigns: --campaigns generated advertisers competing around --themes seed queries of the 60 most popular:
  each promotes 60% of the Home Depot items judged for its seed query (every grade, 1 to 3) plus up to two catalog
  items sharing its rarest word; keywords PHRASE (40%) or EXACT (15%) on the seed query, BROAD on its rarest word
  (30%), or none (15%, automatic targeting, half of them with an audience: users whose recent items lie within
  cosine 0.3 of a promoted item); max CPC 0.30..2.00, a daily budget of 1..3 clicks at that bid (more at second
  prices), a frequency cap of 2..5 ads per user a day;
- clicks (the judgments as the click model): an ad in slot s is clicked with probability 0.9/s^0.7 x a(rel),
  an organic result at position p with 1/p^0.7 x a(rel); a(rel) = 0.03 + 0.37 ((rel - 1)/2)^2 for a judged
  (query, item), 0.06 for an unjudged one. Feedback reports every ad impression (VIEW with its auction id), the
  organic top 5 as views with positions, and the clicks; 5% of ad clicks are sent twice (a retry, same event id)
  and 5% are double clicks (a second click event on the same auction): neither may be charged again.

Keys: `auctions` (searches that showed ads), `revenue` (charged spend), `ad_ctr`, `ad_relevance` /
`organic_relevance` (mean judged relevance of the ads in slot s and of the organic results at position s of the
same answers, over the judged pairs), `max_overspend_clicks` (max over campaigns of (spend - daily budget) / the
dearest click it was charged), `pacing_error` (over the campaigns whose unpaced run spent >= 95% of their
budget: the mean over the day's 24 hours of |spend by hour h - budget x h/24| / budget; `pacing_error_traffic`
the same against the share of the day's requests sent by hour h), `freq_cap_violations` (user-campaign pairs
served more ads in the day than the cap), `double_charges` (auctions charged more than once),
`ads_p99_overhead_ms` (Search p99 with ads minus without, at a steady --latency-rate calls/s: medians of --rounds
alternating rounds). The same day is run
with the second-price auction (paced; the headline), without pacing, with first price and with relevance-only
placement. A plot of spend over the day per campaign goes next to the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from benchutil import ROOT, table, write_json
from suggest_eval import DEFAULT_BUNDLE, ensure_bundle, pct

sys.path.insert(0, str(ROOT))
from common.suggest import phrase_key  # noqa: E402
from training.served import ServedBundle, pb  # noqa: E402

HOURS = 24
STARTUP_MARGIN_S = 10.0  # the day starts this long after the server was up in the previous run


# --- the simulated world -------------------------------------------------------------------------------

def attract(rel: float | None) -> float:
    return 0.06 if rel is None else 0.03 + 0.37 * ((rel - 1.0) / 2.0) ** 2


class World:
    """Queries, users, campaigns and the day's schedule, all from one seed."""

    def __init__(self, prepared: Path, args) -> None:
        rng = random.Random(args.seed)
        items = pd.read_parquet(prepared / "items.parquet")
        judg = pd.read_parquet(prepared / "judgments.parquet")
        judg["key"] = judg["query"].astype(str).map(phrase_key)
        self.grades: dict[tuple[str, str], float] = {
            (q, str(i)): float(r) for q, i, r in zip(judg["key"], judg["item_id"], judg["relevance"])}
        by_query = judg.groupby("key")["item_id"].apply(lambda s: [str(x) for x in s]).to_dict()
        rich = sorted(q for q, its in by_query.items() if len(its) >= 4 and q)
        pool = rng.sample(rich, min(400, len(rich)))
        zipf = np.array([1.0 / (r + 1) ** 0.8 for r in range(len(pool))])
        self.pool, self.weights = pool, zipf / zipf.sum()
        titles = dict(zip(items["item_id"].astype(str), items["title"].astype(str)))
        words: dict[str, list[str]] = defaultdict(list)
        for iid, t in titles.items():
            for w in set(phrase_key(t).split()):
                words[w].append(iid)
        # Campaigns compete: --themes seed queries among the popular ones, several advertisers around each, each
        # promoting its own share of the theme's judged items plus a few catalog items sharing its rarest word.
        self.campaigns = []
        themes = rng.sample(pool[:60], min(args.themes, 60))
        for n in range(args.campaigns):
            seed = themes[n % len(themes)]
            judged = list(by_query[seed])
            promoted = rng.sample(judged, max(2, int(0.6 * len(judged))))
            rare = min(seed.split(), key=lambda w: len(words.get(w, ())) or 10**9)
            extra = [i for i in words.get(rare, []) if i not in promoted]
            promoted += rng.sample(extra, min(2, len(extra)))
            u = rng.random()
            c = pb.Campaign(campaign_id=f"c{n:03d}", advertiser=f"adv{n:03d}", item_ids=promoted[:100],
                            max_cpc=round(rng.uniform(0.30, 2.00), 2), frequency_cap=rng.randint(2, 5))
            c.daily_budget = round(c.max_cpc * rng.uniform(1, 3), 2)  # 1-3 clicks at the bid, more at second prices
            if u < 0.40:
                c.keywords.add(text=seed, match=pb.Keyword.PHRASE)
            elif u < 0.70:  # broad on the seed's rarest word: every query holding it
                c.keywords.add(text=rare, match=pb.Keyword.BROAD)
            elif u < 0.85:
                c.keywords.add(text=seed, match=pb.Keyword.EXACT)
            elif u < 0.925:
                c.audience_min_interest = 0.3
            self.campaigns.append(c)
        users = [f"user{u:04d}" for u in range(args.users)]
        homes = {u: list(np.random.default_rng(args.seed + i).choice(len(pool), 5, p=self.weights))
                 for i, u in enumerate(users)}
        # The day's schedule: times from a diurnal density (1 + 0.6 sin, peak mid-afternoon).
        grid = np.linspace(0, 1, 10_001)
        density = 1 + 0.6 * np.sin(2 * math.pi * (grid - 10 / 24))
        cdf = np.cumsum(density)
        cdf /= cdf[-1]
        times = np.interp(np.sort(np.array([rng.random() for _ in range(args.searches)])), cdf, grid)
        self.schedule = []
        for t in times:
            u = rng.choice(users)
            q = pool[rng.choice(homes[u])] if rng.random() < 0.6 else pool[int(np.searchsorted(np.cumsum(self.weights),
                                                                                              rng.random()))]
            self.schedule.append((float(t), u, q, rng.random() < 0.15, rng.random()))

    def rel(self, query: str | None, item: str) -> float | None:
        return None if query is None else self.grades.get((query, item))


# --- one simulated day on one server --------------------------------------------------------------------

class Day:
    def __init__(self, world: World, served: ServedBundle, day_start: float, day_s: float, seed: int) -> None:
        self.world, self.served, self.stub = world, served, served.stub
        self.start, self.day_s = day_start, day_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.clicked: dict[str, list[str]] = defaultdict(list)
        self.served_to: Counter = Counter()  # (user, campaign) -> ads served
        self.charges: Counter = Counter()  # auction id -> charges seen
        self.prices: dict[str, list[float]] = defaultdict(list)  # campaign -> prices of its charged clicks
        self.ad_imps = self.ad_clicks = self.searches_with_ads = self.requests = self.late = 0
        self.ad_rel: list[float] = []
        self.org_rel: list[float] = []
        self.ad_slots_total = 0
        self.curve: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.ids = 0

    def eid(self) -> str:
        with self.lock:
            self.ids += 1
            return f"e{self.ids}"

    def one(self, entry) -> None:
        t, user, query, similar, u = entry
        wait = self.start + t * self.day_s - time.time()
        if wait > 0:
            time.sleep(wait)
        elif wait < -1:
            with self.lock:
                self.late += 1
        if time.time() >= self.start + self.day_s:
            return  # past the day's end: not sent (counted by `requests`)
        rng = random.Random(f"{u}-{user}")
        if similar and self.clicked[user]:
            source = rng.choice(self.clicked[user])
            resp = self.stub.SimilarItems(pb.SimilarItemsRequest(item_id=source, k=10, user_id=user), timeout=30)
            q = None
        else:
            resp = self.stub.Search(pb.SearchRequest(query=query, k=10, user_id=user), timeout=30)
            q = query
        events = []
        with self.lock:
            self.requests += 1
            if resp.sponsored:
                self.searches_with_ads += 1
            for s in resp.sponsored:
                self.served_to[(user, s.campaign_id)] += 1
                self.ad_slots_total += 1
                if q is not None and s.slot <= len(resp.items):
                    a, o = self.world.rel(q, s.item.item_id), self.world.rel(q, resp.items[s.slot - 1].item_id)
                    if a is not None:
                        self.ad_rel.append(a)
                    if o is not None:
                        self.org_rel.append(o)
        clicks = []  # one Feedback per clicked ad: the charge it answers belongs to that auction
        for s in resp.sponsored:
            events.append(pb.Event(event_id=self.eid(), user_id=user, item_id=s.item.item_id, type=pb.Event.VIEW,
                                   auction_id=s.auction_id))
            if rng.random() < 0.9 / s.slot ** 0.7 * attract(self.world.rel(q, s.item.item_id)):
                click = [pb.Event(event_id=self.eid(), user_id=user, item_id=s.item.item_id, type=pb.Event.CLICK,
                                  auction_id=s.auction_id, query=q or "")]
                if rng.random() < 0.05:  # a double click: a second click event on the same auction
                    click.append(pb.Event(event_id=self.eid(), user_id=user, item_id=s.item.item_id,
                                          type=pb.Event.CLICK, auction_id=s.auction_id))
                clicks.append((s, click))
                with self.lock:
                    self.ad_clicks += 1
                    self.clicked[user].append(s.item.item_id)
        with self.lock:
            self.ad_imps += len(resp.sponsored)
        for p, it in enumerate(resp.items[:5], start=1):
            events.append(pb.Event(event_id=self.eid(), user_id=user, item_id=it.item_id, type=pb.Event.VIEW,
                                   position=p, query=q or ""))
            if rng.random() < 1 / p ** 0.7 * attract(self.world.rel(q, it.item_id)):
                events.append(pb.Event(event_id=self.eid(), user_id=user, item_id=it.item_id, type=pb.Event.CLICK,
                                       position=p, query=q or ""))
                with self.lock:
                    self.clicked[user].append(it.item_id)
        if events:
            self.stub.Feedback(pb.FeedbackRequest(events=events), timeout=30)
        for ad, click in clicks:
            charged = self.stub.Feedback(pb.FeedbackRequest(events=click), timeout=30).charged
            if rng.random() < 0.05:  # a retry of the same request (same event ids): acknowledged, not charged
                charged += self.stub.Feedback(pb.FeedbackRequest(events=click), timeout=30).charged
            with self.lock:
                self.charges[ad.auction_id] += charged
                self.prices[ad.campaign_id] += [ad.cpc] * charged

    def watch(self, stop: threading.Event) -> None:
        """Spend of every campaign through the day (ListCampaigns), for the pacing error and the plot."""
        while not stop.is_set():
            h = (time.time() - self.start) / self.day_s * HOURS
            if 0 <= h <= HOURS:
                for c in self.stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns:
                    self.curve[c.campaign_id].append((h, c.state.spent_today))
            stop.wait(self.day_s / 96)

    def run(self, workers: int) -> None:
        stop = threading.Event()
        watcher = threading.Thread(target=self.watch, args=(stop,), daemon=True)
        watcher.start()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(self.one, self.world.schedule))
        time.sleep(max(0.0, self.start + self.day_s - time.time()))
        stop.set()
        watcher.join()


def metrics(day: Day, world: World, report_rows, budgets: dict[str, float]) -> dict:
    rows = {r.campaign_id: r for r in report_rows}
    revenue = sum(r.spend for r in rows.values())
    clicks_charged = sum(r.clicks for r in rows.values())
    # Over its daily budget, in clicks: / the dearest click it was charged (the click that crossed the budget cost at
    # most that much; "at most one click over" means this stays below 1).
    overspend = [max(0.0, r.spend - budgets[c]) / max(day.prices.get(c) or [r.avg_cpc or 1.0]) for c, r in rows.items()]
    over_money = [max(0.0, r.spend - budgets[c]) for c, r in rows.items()]
    # Each campaign's spend at the end of every hour, against two ideals: even over the clock (the headline), and in
    # step with the day's traffic (what a traffic-aware pacer would aim at). Which campaigns count is decided
    # after every run (pacing_errors): those whose demand exceeds their budget.
    marks = np.arange(1, HOURS + 1)
    times = np.array([t for t, *_ in world.schedule]) * HOURS
    traffic = np.searchsorted(np.sort(times), marks, side="right") / max(len(times), 1)
    by_campaign = {}
    for cid, pts in day.curve.items():
        if not pts:
            continue
        b = budgets[cid]
        at = np.interp(marks, [p[0] for p in pts], [p[1] for p in pts])
        by_campaign[cid] = {"final": float(at[-1]) / b,
                            "clock": float(np.mean(np.abs(at - b * marks / HOURS)) / b),
                            "traffic": float(np.mean(np.abs(at - b * traffic)) / b)}
    caps = {c.campaign_id: c.frequency_cap for c in world.campaigns}
    violations = sum(1 for (u, c), n in day.served_to.items() if caps.get(c, 0) and n > caps[c])
    return {
        "requests": day.requests, "not_sent_past_day_end": len(world.schedule) - day.requests,
        "late_by_over_1s": day.late, "auctions": day.searches_with_ads, "ads_served": day.ad_slots_total,
        "revenue": round(revenue, 2), "charged_clicks": clicks_charged, "ad_clicks": day.ad_clicks,
        "ad_impressions": day.ad_imps, "ad_ctr": round(day.ad_clicks / max(day.ad_imps, 1), 4),
        "ad_relevance": round(statistics.fmean(day.ad_rel), 4) if day.ad_rel else None,
        "organic_relevance": round(statistics.fmean(day.org_rel), 4) if day.org_rel else None,
        "judged_ad_slots": len(day.ad_rel), "judged_organic_slots": len(day.org_rel),
        "max_overspend_clicks": round(max(overspend, default=0.0), 3),
        "max_overspend_money": round(max(over_money, default=0.0), 2),
        "campaigns_over_budget": sum(1 for m in over_money if m > 1e-9),
        "pacing": by_campaign,
        "freq_cap_violations": violations,
        # Charges the server acknowledged per auction (a Feedback per clicked ad): more than one is a double charge.
        "double_charges": sum(max(0, n - 1) for n in day.charges.values()),
        "charges_acknowledged": sum(day.charges.values()),
    }


def latency_client(target: str, queries: list[str], rate: float, seconds: float, ads: bool) -> list[float]:
    """Search calls at a steady rate (asyncio, in a process of its own), latencies in ms."""
    import grpc

    from training.served import pb as _pb
    from training.served import pb_grpc

    tag = os.urandom(4).hex()

    async def run() -> list[float]:
        out: list[float] = []
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.SearchRecommendStub(channel)

            async def call(i: int, q: str) -> None:
                req = _pb.SearchRequest(query=q, k=10, user_id=f"lat-{tag}-{i}")  # new users: no cap binds
                if not ads:
                    req.ad_slots = 0
                t = time.perf_counter()
                await stub.Search(req, timeout=30)
                out.append(1000 * (time.perf_counter() - t))

            tasks, start = [], time.perf_counter()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(call(i, queries[i % len(queries)])))
            await asyncio.gather(*tasks)
        return out

    return asyncio.run(run())


def run_day(bundle: Path, world: World, args, name: str, extra: tuple[str, ...], latency: bool) -> dict:
    state = Path(tempfile.mkdtemp(prefix=f"ads-sim-{name}-"))
    # The day's start is fixed at launch (--ads-day-start-ms), past the start-up this machine needs (measured by
    # the previous run; 60 s before the first).
    lead = args.lead_s
    start = time.time() + lead
    flags = ("--state-dir", str(state), "--ads-day-s", str(args.day_s), "--ads-day-start-ms", str(int(start * 1000)),
             *extra)
    launched = time.time()
    with ServedBundle(bundle, device="cpu", extra_args=flags) as served:
        args.lead_s = time.time() - launched + STARTUP_MARGIN_S
        stub = served.stub
        stub.PutCampaigns(pb.PutCampaignsRequest(campaigns=world.campaigns), timeout=60)
        if time.time() > start:
            print(f"  {name}: the server took longer to start than the day's lead ({lead:.0f} s); the day began "
                  f"{time.time() - start:.0f} s early for it")
        day = Day(world, served, start, args.day_s, args.seed)
        day.run(args.workers)
        wall = time.time() - start  # the day, and the requests still in flight at its end
        report = stub.AdsReport(pb.AdsReportRequest(from_day="day-0", to_day="day-0"), timeout=60).rows
        budgets = {c.campaign_id: c.daily_budget for c in world.campaigns}
        out = metrics(day, world, report, budgets)
        out["day_wall_s"] = round(wall, 1)
        out["curve"] = {c: [(round(h, 3), round(s, 3)) for h, s in pts] for c, pts in day.curve.items()}
        if latency:  # day-1 has begun: fresh budgets, no clicks from here on, so every campaign can serve
            queries = [q for _, _, q, _, _ in world.schedule][:2000]
            rounds = {"ads": [], "no_ads": []}
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as gen:
                gen.submit(latency_client, served.target, queries, args.latency_rate, 3.0, True).result()  # warm-up
                for r in range(args.rounds):
                    for arm in (("ads", "no_ads") if r % 2 == 0 else ("no_ads", "ads")):
                        lat = gen.submit(latency_client, served.target, queries[r * 97:] + queries, args.latency_rate,
                                         args.latency_s, arm == "ads").result()
                        rounds[arm].append((statistics.median(lat), pct(lat, 0.99)))
            p99 = {arm: statistics.median(r[1] for r in v) for arm, v in rounds.items()}
            p50 = {arm: statistics.median(r[0] for r in v) for arm, v in rounds.items()}
            out.update(search_p99_ms_ads=round(p99["ads"], 2), search_p99_ms_no_ads=round(p99["no_ads"], 2),
                       search_p50_ms_ads=round(p50["ads"], 2), search_p50_ms_no_ads=round(p50["no_ads"], 2),
                       ads_p99_overhead_ms=round(p99["ads"] - p99["no_ads"], 2),
                       p99_rounds={arm: [round(x[1], 2) for x in v] for arm, v in rounds.items()})
        out["version"] = served.version
    return out


def pacing_errors(runs: dict) -> None:
    """pacing_error of every run over one set of campaigns: those that spent >= 95% of their budget without pacing
    (their demand exceeds the budget: there is something to spread); without an unpaced run, each run's own."""
    ref = runs.get("gsp_unpaced")
    for r in runs.values():
        base = (ref or r)["pacing"]
        limited = [c for c, p in base.items() if p["final"] >= 0.95]
        per = [r["pacing"][c] for c in limited if c in r["pacing"]]
        r["budget_limited_campaigns"] = len(limited)
        r["pacing_error"] = round(statistics.fmean(p["clock"] for p in per), 4) if per else None
        r["pacing_error_traffic"] = round(statistics.fmean(p["traffic"] for p in per), 4) if per else None
        r["budget_spent_share"] = round(statistics.fmean(min(p["final"], 1.0) for p in per), 4) if per else None


def plot(runs: dict, world: World, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = {c.campaign_id: c.daily_budget for c in world.campaigns}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = ((axes[0], "gsp", "second price, paced"), (axes[1], "gsp_unpaced", "second price, no pacing"))
    for ax, name, title in panels:
        for cid, pts in runs[name]["curve"].items():
            if not pts or pts[-1][1] <= 0:
                continue
            h = [p[0] for p in pts]
            ax.plot(h, [p[1] / budgets[cid] for p in pts], lw=0.8, alpha=0.6)
        ax.plot([0, HOURS], [0, 1], "k--", lw=1.2, label="ideal (even over the day)")
        ax.set_title(f"{title}: pacing error {runs[name]['pacing_error']}")
        ax.set_xlabel("hour of the simulated day")
        ax.set_xlim(0, HOURS)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("spend / daily budget (one line per campaign)")
    fig.suptitle("Sponsored products on Home Depot: campaign spend over one simulated day")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--prepared", type=Path, default=None, help="the prepared Home Depot folder (with --bundle)")
    ap.add_argument("--searches", type=int, default=3000, help="requests in the simulated day")
    ap.add_argument("--day-s", type=float, default=120.0, help="seconds of wall time the simulated day lasts")
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--campaigns", type=int, default=60)
    ap.add_argument("--themes", type=int, default=30, help="seed queries the campaigns compete around")
    ap.add_argument("--workers", type=int, default=4, help="client threads sending the day's requests")
    ap.add_argument("--latency-rate", type=float, default=40.0,
                    help="Search calls/s for the ads-vs-none latency rounds")
    ap.add_argument("--latency-s", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mechanisms", default="gsp,gsp_unpaced,first_price,relevance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.lead_s = 60.0

    if args.bundle is None:
        bundle, prepared = ensure_bundle(DEFAULT_BUNDLE, args.seed)
    else:
        bundle = args.bundle
        prepared = args.prepared or DEFAULT_BUNDLE.parent / f"{DEFAULT_BUNDLE.name}.work" / "prepared"
    world = World(prepared, args)
    print(f"{len(world.campaigns)} campaigns, {len(world.schedule)} requests over a {args.day_s:g} s day, "
          f"{args.users} users, {len(world.pool)} queries")
    flags = {"gsp": (), "gsp_unpaced": ("--no-ads-pacing",), "first_price": ("--ads-auction", "first_price"),
             "relevance": ("--ads-auction", "relevance")}
    runs = {}
    for name in args.mechanisms.split(","):
        print(f"- {name} ...", flush=True)
        runs[name] = run_day(bundle, world, args, name, flags[name], latency=name == "gsp")
        r = runs[name]
        print(f"  revenue {r['revenue']}, ad CTR {r['ad_ctr']}, ad relevance {r['ad_relevance']} vs organic "
              f"{r['organic_relevance']}, overspend {r['max_overspend_clicks']} clicks, cap violations "
              f"{r['freq_cap_violations']}, double charges {r['double_charges']}", flush=True)
    pacing_errors(runs)
    head = runs.get("gsp") or next(iter(runs.values()))
    keys = ["auctions", "revenue", "ad_ctr", "ad_relevance", "organic_relevance", "max_overspend_clicks",
            "pacing_error", "freq_cap_violations", "double_charges"]
    result = {k: head[k] for k in keys}
    result.update(
        ads_p99_overhead_ms=head.get("ads_p99_overhead_ms"),
        relevance_ratio=round(head["ad_relevance"] / head["organic_relevance"], 4)
        if head["ad_relevance"] and head["organic_relevance"] else None,
        pacing_error_definition="over the campaigns that spent >= 95% of their daily budget without pacing (demand "
                                "above budget): mean over the day's 24 hours of |spend by the end of hour h - budget "
                                "x h/24| / budget; pacing_error_traffic: the same against budget x the share of the "
                                "day's requests sent by then",
        bundle=str(bundle), searches=args.searches, day_s=args.day_s, users=args.users, campaigns=len(world.campaigns),
        latency_rate=args.latency_rate, seed=args.seed,
        pacing_error_traffic=head.get("pacing_error_traffic"),
        runs={n: {k: v for k, v in r.items() if k not in ("curve", "pacing")} for n, r in runs.items()})
    cols = ["revenue", "ad_ctr", "ad_relevance", "organic_relevance", "pacing_error", "pacing_error_traffic",
            "budget_spent_share", "max_overspend_clicks", "auctions", "freq_cap_violations", "double_charges"]
    rows = [{"": n, **{k: r.get(k) for k in cols}} for n, r in runs.items()]
    print(table(rows, [""] + cols))
    if "ads_p99_overhead_ms" in head:
        print(f"Search p99 at {args.latency_rate:g} calls/s: {head['search_p99_ms_ads']} ms with ads, "
              f"{head['search_p99_ms_no_ads']} ms without: +{head['ads_p99_overhead_ms']} ms "
              f"(medians of {args.rounds} rounds each; rounds {head['p99_rounds']})")
    if args.json is not None:
        write_json(args.json, result)
        if "gsp" in runs and "gsp_unpaced" in runs:
            png = args.json.with_suffix(".png")
            plot(runs, world, png)
            print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
