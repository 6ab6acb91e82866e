"""The click model and the auction.

Click model (`CtrModel`): separable, position x item, as ad platforms start out.
- `ctr1`: the click-through rate of slot 1, from ad impressions and clicks there, smoothed toward the organic
  click-through of position 1 (from organic VIEW/CLICK events with a position), which is all there is on day one;
- `examination[s]`: how much less a lower slot is looked at (ad slots' CTR relative to slot 1, smoothed toward the
  organic position curve, itself smoothed toward 1/s^0.5);
- an item factor, clicks over expected clicks (COEC) of the item in ad and organic slots (its views weighted by
  1/sqrt(position), times ctr1), shrunk toward 1.
pCTR(item, slot s) = ctr1 x COEC(item) x examination[s]. The counts come from `server.ads.ledger.Ledger`.

Auction (`run_auction`): one ad per campaign (its best item) and per item, bids below the reserve out, ranked
by expected value pCTR x bid x quality (quality: how high the organic ranker would have placed the item).
- gsp: the ad in slot i pays the least bid that keeps its place, max(reserve, score_{i+1} / (pCTR_i x quality_i)),
  never more than its bid; the last slot is priced by the first loser (or the reserve);
- first_price: the same ranking, each pays its bid;
- relevance: ranked by organic relevance alone, each pays its bid (the no-auction baseline).
Ties in expected value are broken by a hash of the auction and campaign (fair over many auctions); tied ads pay
their own bid, as the second-price rule says.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

MECHANISMS = ("gsp", "first_price", "relevance")
DEFAULT_CTR1 = 0.05  # slot-1 CTR before any event says otherwise
PRIOR_VIEWS = 200.0  # pseudo-impressions behind each smoothed rate
PRIOR_CLICKS = 5.0  # pseudo-clicks behind each item's COEC (shrinks a new item's factor toward 1)
MAX_SLOTS = 5
CENT = 0.01


@dataclass(frozen=True)
class Bid:
    campaign_id: str
    advertiser: str
    row: int            # the promoted item's row in the bundle's item table
    item_id: str
    bid: float          # max CPC
    pctr: float         # in slot 1
    quality: float      # (0, 1]
    relevance: float    # the organic ranker's score

    @property
    def value(self) -> float:
        return self.pctr * self.bid * self.quality


@dataclass(frozen=True)
class Win:
    bid: Bid
    slot: int   # 1-based
    price: float


class CtrModel:
    """pCTR from the ledger's counts (see the module docstring)."""

    def __init__(self, ledger) -> None:
        self.ledger = ledger

    def _organic_curve(self, slots: int) -> list[float]:
        views, clicks = self.ledger.organic_by_position
        base = [1.0 / (s ** 0.5) for s in range(1, slots + 1)]
        c1 = (clicks.get(1, 0) + DEFAULT_CTR1 * PRIOR_VIEWS) / (views.get(1, 0) + PRIOR_VIEWS)
        out = []
        for s in range(1, slots + 1):
            cs = (clicks.get(s, 0) + c1 * base[s - 1] * PRIOR_VIEWS) / (views.get(s, 0) + PRIOR_VIEWS)
            out.append(cs)
        return out

    def slot_rates(self, slots: int = MAX_SLOTS) -> list[float]:
        """Smoothed click-through rate of each ad slot 1..slots."""
        organic = self._organic_curve(slots)
        imps, clicks = self.ledger.ads_by_slot
        return [(clicks.get(s, 0) + organic[s - 1] * PRIOR_VIEWS) / (imps.get(s, 0) + PRIOR_VIEWS)
                for s in range(1, slots + 1)]

    def pctr(self, item_id: str, rates: list[float]) -> float:
        """Slot-1 pCTR of an item (rates: `slot_rates()`, computed once per request)."""
        got, weighted_views = self.ledger.item_clicks(item_id)
        coec = (got + PRIOR_CLICKS) / (rates[0] * weighted_views + PRIOR_CLICKS)
        return min(max(rates[0] * coec, 1e-4), 0.9)


def _tiebreak(auction: str, campaign_id: str) -> bytes:
    return hashlib.blake2b(f"{auction}|{campaign_id}".encode("utf-8"), digest_size=8).digest()


def _round_price(price: float, bid: float) -> float:
    """To the cent above (a price is never below what the rule says), never above the bid."""
    cents = -(-round(price / CENT, 6) // 1)
    return min(cents * CENT, bid)


def run_auction(bids: list[Bid], slots: int, reserve: float, mechanism: str = "gsp", auction: str = "") -> list[Win]:
    """Winners of up to `slots` slots, best first, with the price a click on each costs."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}")
    key = (lambda b: (-b.relevance, _tiebreak(auction, b.campaign_id))) if mechanism == "relevance" else \
          (lambda b: (-b.value, _tiebreak(auction, b.campaign_id)))
    ranked = sorted((b for b in bids if b.bid >= reserve and b.value > 0), key=key)
    # One ad per campaign (its best) and one per item (two campaigns promoting it: the better one).
    seen_c: set[str] = set()
    seen_i: set[int] = set()
    field: list[Bid] = []
    for b in ranked:
        if b.campaign_id in seen_c or b.row in seen_i:
            continue
        seen_c.add(b.campaign_id)
        seen_i.add(b.row)
        field.append(b)
    wins = []
    for i, b in enumerate(field[:slots]):
        if mechanism == "gsp":
            nxt = field[i + 1].value if i + 1 < len(field) else 0.0
            price = max(reserve, nxt / (b.pctr * b.quality))
            price = _round_price(price, b.bid)
        else:
            price = b.bid
        wins.append(Win(b, i + 1, price))
    return wins
