"""Sponsored slots for one request: eligible campaigns -> their promoted items -> the relevance floor (scored by
the organic ranker inside the Search batch, server.engine) -> pCTR x bid x quality -> the auction -> frequency
caps counted in the store -> signed auction ids.

Nothing here talks protobuf; the service turns `Sponsored` into SponsoredItem messages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from server.ads.auction import Bid, CtrModel, run_auction
from server.ads.campaigns import SERVING, CampaignSet, category_ok, interest, state
from server.ads.tokens import AuctionTokens, Sold
from server.bundle import Bundle
from server.config import ServerConfig
from server.state import LiveState

QUALITY_RANKS = 10.0  # quality halves when the organic ranker would have placed the item this many ranks lower


@dataclass(frozen=True)
class Sponsored:
    row: int
    slot: int
    campaign_id: str
    advertiser: str
    price: float
    pctr: float
    relevance: float
    auction_id: str


@dataclass
class Candidates:
    """Eligible campaigns' promoted rows for one request."""

    rows: np.ndarray                       # unique rows to score
    by_row: dict[int, list[str]]           # row -> campaign ids promoting it
    now_ms: int
    day: int


def quality(organic_rank: int) -> float:
    return 1.0 / (1.0 + (organic_rank - 1) / QUALITY_RANKS)


class AdServer:
    """Campaign targeting, eligibility and the auction for one server (its live state and config)."""

    def __init__(self, live: LiveState, config: ServerConfig, tokens: AuctionTokens) -> None:
        self.live = live
        self.config = config
        self.tokens = tokens
        self.ctr = CtrModel(live.ads)
        self._set, self._version = CampaignSet(), -1

    @property
    def campaigns(self) -> CampaignSet:
        if self._version != self.live.campaigns_version:
            self._set, self._version = CampaignSet(dict(self.live.campaigns)), self.live.campaigns_version
        return self._set

    def state(self, c: dict, now_ms: float | None = None) -> str:
        now = time.time() * 1000 if now_ms is None else now_ms
        cfg = self.config
        return state(c, now, self.live.ads, self.live.ads.clock, cfg.ads_pacing, cfg.ads_pacing_lookahead)

    def slots(self, requested: int | None) -> int:
        return self.config.ads_slots if requested is None else requested

    def candidates(self, bundle: Bundle, campaign_ids: list[str], caps: dict[str, int],
                   user_vector: np.ndarray | None) -> Candidates | None:
        """The promoted rows of the campaigns that may serve now (status, dates, budgets, pacing, caps, audience)."""
        if not campaign_ids:
            return None
        now = int(time.time() * 1000)
        day = self.live.ads.clock.day(now)
        ids = bundle.items.id_to_row
        by_row: dict[int, list[str]] = {}
        for cid in campaign_ids:
            c = self.live.campaigns.get(cid)
            if c is None or self.state(c, now) != SERVING:
                continue
            if c["frequency_cap"] > 0 and caps.get(cid, 0) >= c["frequency_cap"]:
                continue
            rows = np.array([r for r in (ids.get(i) for i in c["item_ids"]) if r is not None], np.int64)
            if c["audience_min_interest"] > 0:
                if user_vector is None:
                    continue
                rows = rows[interest(user_vector, bundle.vectors, rows) >= c["audience_min_interest"]]
            for r in rows.tolist():
                by_row.setdefault(r, []).append(cid)
        if not by_row:
            return None
        return Candidates(np.fromiter(by_row, np.int64, len(by_row)), by_row, now, day)

    def auction(self, bundle: Bundle, cands: Candidates, rows: np.ndarray, relevance: np.ndarray,
                organic_rank: np.ndarray, slots: int, organic_categories: set[str], exclude: set[int]) -> list[Bid]:
        """The bids of the candidate rows that passed the relevance floor (rows, relevance: their organic score,
        organic_rank: where the organic ranking would have placed them), and the auction's winners."""
        items = bundle.items
        rates = self.ctr.slot_rates()
        bids = []
        for r, rel, rank in zip(rows.tolist(), relevance.tolist(), organic_rank.tolist()):
            if r in exclude:
                continue
            for cid in cands.by_row.get(r, ()):
                c = self.live.campaigns[cid]
                if not category_ok(c, organic_categories):
                    continue
                bids.append(Bid(cid, c["advertiser"], r, items.ids[r], c["max_cpc"], self.ctr.pctr(items.ids[r], rates),
                                quality(int(rank)), float(rel)))
        return bids

    def run(self, bids: list[Bid], slots: int, auction_key: str):
        return run_auction(bids, slots, self.config.ads_reserve_cpc, self.config.ads_auction, auction_key)

    def sold(self, wins, day: int, now_ms: int, allowed: list[bool]) -> list[Sponsored]:
        """Winners the caps let through, in slot order (renumbered), each with its signed auction id."""
        out: list[Sponsored] = []
        for w, ok in zip(wins, allowed):
            if not ok:
                continue
            slot = len(out) + 1
            token = self.tokens.issue(Sold(w.bid.campaign_id, w.bid.item_id, w.price, day, now_ms, slot))
            out.append(Sponsored(w.bid.row, slot, w.bid.campaign_id, w.bid.advertiser, w.price, w.bid.pctr,
                                 w.bid.relevance, token))
        return out


def user_interest(bundle: Bundle, rows: list[int]) -> np.ndarray | None:
    """The user's interest vector: the normalised mean of the vectors of their recent items (None: no history)."""
    if not rows:
        return None
    v = bundle.vectors[np.asarray(rows, np.int64)].astype(np.float32).mean(axis=0)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else None
