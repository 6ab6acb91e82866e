"""Per-campaign, per-day counters and the billing decision, applied from the event stream in its order.

Every replica (and a replay of the local log) applies the same events in the same order, so they agree on what
was spent. With the local store the ledger decides each charge itself; with a shared store the decision is made
once, atomically, in the store (server.store.redisstore) and the ledger applies it (`charged`).

A click is charged when it names a valid auction (a signed id, server.ads.tokens), its auction was not charged
before (one charge per auction: a double click or a retried event with a new id costs nothing), and the
campaign's budget for the auction's day and its total budget are not spent yet. The charge is the auction's price
(<= the bid), so a budget is exceeded by less than one click's price at most. A click past the budget is counted
as unbilled (the ad was shown before the budget ran out).
"""
from __future__ import annotations

import datetime as dt
import math
from collections import OrderedDict, defaultdict
from typing import Any, Callable

MAX_CHARGED_IDS = 2_000_000  # charged auction ids remembered (a click on an older one is not charged again either: see CLICK_WINDOW_DAYS)
CLICK_WINDOW_DAYS = 1  # clicks later than this many days after the auction's day are not charged
VIEW, CLICK = 1, 2


class DayClock:
    """Budget days: UTC days, or for simulations days of `day_s` seconds (--ads-day-s) counted from `start_ms`
    (--ads-day-start-ms), named day-N."""

    def __init__(self, day_s: float = 86400.0, start_ms: int = 0) -> None:
        self.day_ms = day_s * 1000.0
        self.start_ms = start_ms
        self.utc = self.day_ms == 86_400_000 and start_ms == 0

    def day(self, ms: float) -> int:
        return int((ms - self.start_ms) // self.day_ms)

    def fraction(self, ms: float) -> float:
        """How much of the day `ms` falls in has gone by, 0..1."""
        return ((ms - self.start_ms) % self.day_ms) / self.day_ms

    def name(self, day: int) -> str:
        if self.utc:
            return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()
        return f"day-{day}"

    def parse(self, text: str) -> int:
        """A day name -> its number; ValueError when it is not one."""
        if self.utc:
            return (dt.date.fromisoformat(text) - dt.date(1970, 1, 1)).days
        if not text.startswith("day-"):
            raise ValueError(f"expected day-N (simulated days), got {text!r}")
        return int(text[4:])


def new_row() -> list[float]:
    return [0, 0, 0, 0.0, 0]  # served, impressions, clicks, spend, unbilled clicks


SERVED, IMPS, CLICKS, SPEND, UNBILLED = range(5)


class Ledger:
    """What was served, seen, clicked and spent per campaign and day; the click model's counts."""

    def __init__(self, campaigns: Callable[[str], dict[str, Any] | None], clock: DayClock | None = None) -> None:
        self.campaign = campaigns  # campaign id -> its record as of now (in stream order)
        self.clock = clock or DayClock()
        self.rows: dict[str, dict[int, list[float]]] = defaultdict(dict)
        self.spent_total: dict[str, float] = defaultdict(float)
        self.charged: OrderedDict[str, str] = OrderedDict()  # charged auction id -> the click event charged
        self.user_caps: dict[tuple[str, int], dict[str, int]] = {}  # (user, day) -> campaign -> ads served
        self.ads_imps: dict[int, int] = defaultdict(int)
        self.ads_clicks: dict[int, int] = defaultdict(int)
        self.org_views: dict[int, int] = defaultdict(int)
        self.org_clicks: dict[int, int] = defaultdict(int)
        self._item_clicks: dict[str, float] = defaultdict(float)
        self._item_views: dict[str, float] = defaultdict(float)  # views weighted by 1/sqrt(position)

    # --- reads ---------------------------------------------------------------------------------
    @property
    def ads_by_slot(self) -> tuple[dict[int, int], dict[int, int]]:
        return self.ads_imps, self.ads_clicks

    @property
    def organic_by_position(self) -> tuple[dict[int, int], dict[int, int]]:
        return self.org_views, self.org_clicks

    def item_clicks(self, item_id: str) -> tuple[float, float]:
        return self._item_clicks.get(item_id, 0.0), self._item_views.get(item_id, 0.0)

    def spent(self, campaign_id: str, day: int) -> float:
        row = self.rows.get(campaign_id, {}).get(day)
        return float(row[SPEND]) if row else 0.0

    def row(self, campaign_id: str, day: int) -> list[float]:
        return self.rows[campaign_id].setdefault(day, new_row())

    # --- billing --------------------------------------------------------------------------------
    def can_charge(self, campaign: dict[str, Any] | None, day: int) -> bool:
        if campaign is None:
            return False
        total = campaign["total_budget"]
        return self.spent(campaign["campaign_id"], day) < campaign["daily_budget"] and (
            total <= 0 or self.spent_total[campaign["campaign_id"]] < total)

    def apply(self, ev, charged: bool | None = None) -> None:
        """One recorded event (server.state.Event). charged: the store's decision, or None to decide here."""
        ad = ev.ad
        if ad is None:
            if ev.position > 0 and ev.type in (VIEW, CLICK):
                (self.org_views if ev.type == VIEW else self.org_clicks)[ev.position] += 1
                if ev.type == VIEW:
                    self._item_views[ev.item_id] += 1.0 / math.sqrt(ev.position)
                else:
                    self._item_clicks[ev.item_id] += 1.0
            return
        campaign_id, price, day, slot = ad
        if ev.type == VIEW:
            self.row(campaign_id, day)[IMPS] += 1
            self.ads_imps[slot] += 1
            self._item_views[ev.item_id] += 1.0 / math.sqrt(slot)
        elif ev.type == CLICK:
            self.ads_clicks[slot] += 1
            self._item_clicks[ev.item_id] += 1.0
            if charged is None:
                charged = self.decide(ev)
            if charged:
                self.charged[ev.auction_id] = ev.event_id
                if len(self.charged) > MAX_CHARGED_IDS:
                    self.charged.popitem(last=False)
                r = self.row(campaign_id, day)
                r[CLICKS] += 1
                r[SPEND] += price
                self.spent_total[campaign_id] += price
            elif ev.auction_id not in self.charged:
                self.row(campaign_id, day)[UNBILLED] += 1

    def decide(self, ev) -> bool:
        """Charge this click? (local store and replay; the shared store runs the same rule in Redis)."""
        campaign_id, _price, day, _slot = ev.ad
        if ev.auction_id in self.charged:
            return False
        if self.clock.day(ev.timestamp_ms) > day + CLICK_WINDOW_DAYS:
            return False
        return self.can_charge(self.campaign(campaign_id), day)

    # --- serving --------------------------------------------------------------------------------
    def serve(self, user: str, wins: list[tuple[str, int]], day: int) -> list[bool]:
        """Count served ads (campaign id, frequency cap) for a user; False for one that would pass its cap."""
        out = []
        for campaign_id, cap in wins:
            if user and cap > 0:
                mine = self.user_caps.setdefault((user, day), {})
                n = mine.get(campaign_id, 0)
                if n >= cap:
                    out.append(False)
                    continue
                mine[campaign_id] = n + 1
            self.row(campaign_id, day)[SERVED] += 1
            out.append(True)
        if len(self.user_caps) > 1_000_000:  # keep today's
            self.user_caps = {k: v for k, v in self.user_caps.items() if k[1] >= day}
        return out

    def report(self, campaign_ids: list[str], first: int, last: int) -> dict[str, dict[int, list[float]]]:
        return {c: {d: list(r) for d, r in self.rows.get(c, {}).items() if first <= d <= last} for c in campaign_ids}
