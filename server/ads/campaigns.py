"""Campaign records, their targeting compiled for serving, eligibility and pacing.

A campaign is a plain dict (the form the log and the store keep; the service validates it). `CampaignSet` is
compiled once per change: `matching(query)` finds the campaigns a Search query targets by keyword (exact: the
query is the keyword; phrase: its words in a row; broad: all its words, any order; none: automatic targeting)
less those with a negative keyword in it. `state()` says whether a campaign may serve now: status, dates,
budgets and pacing (docs/ads.md).

Pacing (throttling): a campaign serves only while its spend today is below its daily budget times the share of
the day gone by plus a look-ahead (one hour by default), so a budget lasts the day instead of the first hour.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.suggest import phrase_key
from common.text import SEP
from server.ads.ledger import DayClock, Ledger

MAX_ITEMS = 100
MAX_KEYWORDS = 1000
MAX_CATEGORIES = 100
MAX_CAMPAIGNS = 100_000
MATCHES = ("broad", "phrase", "exact")
SERVING = "serving"


def _contains(query: str, phrase: str) -> bool:
    return f" {phrase} " in f" {query} "


@dataclass
class CampaignSet:
    campaigns: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._exact: dict[str, list[str]] = {}
        self._by_word: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {}  # first word -> (cid, match, words)
        self._auto: list[str] = []
        self.negatives: dict[str, list[frozenset[str]]] = {}
        for cid in sorted(self.campaigns):
            c = self.campaigns[cid]
            if not c["keywords"]:
                self._auto.append(cid)
            for text, match in c["keywords"]:
                words = tuple(text.split())
                if match == "exact":
                    self._exact.setdefault(text, []).append(cid)
                else:
                    self._by_word.setdefault(words[0], []).append((cid, match, words))
            if c["negative_keywords"]:
                self.negatives[cid] = [frozenset(n.split()) for n in c["negative_keywords"]]

    def __len__(self) -> int:
        return len(self.campaigns)

    def matching(self, text: str) -> list[str]:
        """Campaign ids whose keywords target this query (automatic ones included), negatives applied."""
        if not self.campaigns:
            return []
        q = phrase_key(text)
        words = set(q.split())
        hit = dict.fromkeys(self._exact.get(q, ()))
        for w in words:
            for cid, match, kw in self._by_word.get(w, ()):
                if cid in hit:
                    continue
                if (match == "phrase" and _contains(q, " ".join(kw))) or (match == "broad" and words.issuperset(kw)):
                    hit[cid] = None
        hit.update(dict.fromkeys(self._auto))
        return [cid for cid in hit if not any(n <= words for n in self.negatives.get(cid, ()))]

    def untargeted(self) -> list[str]:
        """Campaign ids for Recommend and SimilarItems (keywords do not apply there)."""
        return list(self.campaigns)


def state(c: dict[str, Any], now_ms: float, ledger: Ledger, clock: DayClock, pacing: bool,
          lookahead: float) -> str:
    """"serving", or why the campaign does not serve now."""
    if c["status"] != "active":
        return "paused"
    if c["start_ms"] and now_ms < c["start_ms"]:
        return "scheduled"
    if c["end_ms"] and now_ms >= c["end_ms"]:
        return "ended"
    cid, day = c["campaign_id"], clock.day(now_ms)
    spent = ledger.spent(cid, day)
    if c["total_budget"] > 0 and ledger.spent_total[cid] >= c["total_budget"]:
        return "total budget spent"
    if spent >= c["daily_budget"]:
        return "daily budget spent"
    if pacing and spent >= c["daily_budget"] * min(1.0, clock.fraction(now_ms) + lookahead):
        return "paced"
    return SERVING


def category_ok(c: dict[str, Any], categories: set[str]) -> bool:
    """Does the campaign's category targeting admit a request whose organic results have these categories?"""
    wanted = c["categories"]
    if not wanted:
        return True
    return any(have == w or have.startswith(w + SEP) for have in categories for w in wanted)


def interest(user_vector: np.ndarray | None, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine of each promoted row's vector to the user's interest vector (0 without one)."""
    if user_vector is None or not len(rows):
        return np.zeros(len(rows), np.float32)
    return vectors[rows].astype(np.float32) @ user_vector
