"""Real-time state that outlives bundles: users' recent events, live item counters, seen event ids
and live catalog changes, all made durable by the event log under --state-dir.

Writes go log-first: a request's records are appended (and fsynced) before they are applied in
memory, and only then acknowledged; on start the log is replayed in order, so everything that was
acknowledged is back and a torn last record (a crash mid-append) is dropped and reported.
Per-user state is bounded to the last `max_events` events (see `bytes_per_user`), and the number of
users held to `max_users` (least recently active evicted first).
"""
from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.eventlog import EventLog, LogScan
from server.ads.ledger import DayClock, Ledger

log = logging.getLogger(__name__)

VIEW, CLICK, ADD_TO_CART, PURCHASE = 1, 2, 3, 4
EVENT_WEIGHT = {VIEW: 0.25, CLICK: 0.5, ADD_TO_CART: 1.0, PURCHASE: 1.0}  # live popularity per event


@dataclass(frozen=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    type: int
    timestamp_ms: int
    query: str = ""
    position: int = 0
    auction_id: str = ""  # an event about an ad (its signed auction id, server.ads.tokens) ...
    ad: tuple | None = None  # ... and what the id says: (campaign id, price, budget day, slot)

    def __post_init__(self) -> None:
        if self.ad is not None and not isinstance(self.ad, tuple):  # a list when read back from the log
            object.__setattr__(self, "ad", tuple(self.ad))

    def record(self) -> dict[str, Any]:
        out = {"event_id": self.event_id, "user_id": self.user_id, "item_id": self.item_id, "type": self.type,
               "timestamp_ms": self.timestamp_ms, "query": self.query, "position": self.position}
        if self.auction_id:
            out.update(auction_id=self.auction_id, ad=list(self.ad) if self.ad is not None else None)
        return out


@dataclass
class ReplayReport:
    records: int = 0
    events: int = 0
    upserts: int = 0
    deletes: int = 0
    torn_bytes: int = 0
    problem: str = ""
    seconds: float = 0.0


class LiveState:
    """Users' recent events, live counters, seen event ids and catalog changes (+ their log)."""

    def __init__(self, state_dir: Path | None, max_events: int = 50, max_event_ids: int = 1_000_000,
                 fsync: bool = True, max_users: int = 1_000_000, ads_day_s: float = 86400.0,
                 ads_day_start_ms: int = 0) -> None:
        self.max_events = max_events
        self.max_users = max_users
        # user -> (item_id, type), oldest first; least recently active user first, so memory stays
        # bounded at max_users x bytes_per_user. An evicted user's events stay in the log (and in the next build).
        self.users: OrderedDict[str, deque[tuple[str, int]]] = OrderedDict()
        self.evicted_users = 0
        self.item_counts: dict[str, float] = {}
        self.event_ids: OrderedDict[str, None] = OrderedDict()  # insertion-ordered, bounded
        self.max_event_ids = max_event_ids
        self.items: dict[str, dict[str, Any] | None] = {}  # item_id -> upserted fields, None = deleted
        # Searches the event stream reports (an engaged event's query): the suggestions' live log.
        self.query_counts: dict[str, float] = {}
        self.query_listeners: list = []  # callables (query, weight): the served suggesters
        self.rules: dict[str, dict[str, Any]] = {}  # rule_id -> merchandising rule (server.rules)
        self.rules_version = 0  # bumped by every rule change: the compiled RuleSet is rebuilt from it
        self.campaigns: dict[str, dict[str, Any]] = {}  # campaign_id -> sponsored-products campaign (server.ads)
        self.campaigns_version = 0
        self.ads = Ledger(self.campaigns.get, DayClock(ads_day_s, ads_day_start_ms))  # spend, clicks, impressions per campaign and day
        self.log: EventLog | None = None
        self.replay_report = ReplayReport()
        if state_dir is not None:
            self.log = EventLog(Path(state_dir), fsync=fsync)
            self._replay(self.log.scan)

    # --- replay ----------------------------------------------------------------------------
    def _replay(self, scan: LogScan) -> None:
        started = time.perf_counter()
        rep = self.replay_report
        for record in scan.records:
            rep.records += 1
            kind = record.get("kind")
            if kind == "feedback":
                events = [Event(**e) for e in record["events"]]
                self.apply_events(events)
                rep.events += len(events)
            elif kind == "upsert":
                self.apply_upserts(record["items"])
                rep.upserts += len(record["items"])
            elif kind == "delete":
                self.apply_deletes(record["item_ids"])
                rep.deletes += len(record["item_ids"])
            elif kind == "rules":
                self.apply_rules(record["rules"])
            elif kind == "campaigns":
                self.apply_campaigns(record["campaigns"])
        rep.torn_bytes, rep.problem = scan.torn_bytes, scan.problem
        rep.seconds = time.perf_counter() - started
        if scan.torn_bytes:
            log.warning("event log: dropped a torn tail of %d bytes (%s); every acknowledged record is kept",
                        scan.torn_bytes, scan.problem)
        if rep.records:
            log.info("event log replayed: %d records, %d events, %d upserts, %d deletes in %.2fs",
                     rep.records, rep.events, rep.upserts, rep.deletes, rep.seconds)

    # --- writes: log first, then memory ------------------------------------------------------
    def is_duplicate(self, event_id: str) -> bool:
        return event_id in self.event_ids

    def record_events(self, events: list[Event]) -> None:
        """Durably log one request's events (all in one record), then apply them."""
        if not events:
            return
        if self.log is not None:
            self.log.append({"kind": "feedback", "events": [e.record() for e in events]})
        self.apply_events(events)

    def record_upserts(self, items: list[dict[str, Any]]) -> None:
        if self.log is not None:
            self.log.append({"kind": "upsert", "items": items})
        self.apply_upserts(items)

    def record_rules(self, records: list[dict[str, Any]]) -> None:
        if self.log is not None:
            self.log.append({"kind": "rules", "rules": records})
        self.apply_rules(records)

    def record_campaigns(self, records: list[dict[str, Any]]) -> None:
        if self.log is not None:
            self.log.append({"kind": "campaigns", "campaigns": records})
        self.apply_campaigns(records)

    def record_deletes(self, item_ids: list[str]) -> None:
        if self.log is not None:
            self.log.append({"kind": "delete", "item_ids": item_ids})
        self.apply_deletes(item_ids)

    # --- in-memory application (also used by replay) ----------------------------------------
    def apply_events(self, events: list[Event], charged: set[str] | None = None) -> None:
        """charged: the event ids of ad clicks the shared store charged (None: the ledger decides, in order)."""
        for e in events:
            if e.ad is not None or e.position > 0:
                self.ads.apply(e, None if charged is None else e.event_id in charged)
            self.event_ids[e.event_id] = None
            if len(self.event_ids) > self.max_event_ids:
                self.event_ids.popitem(last=False)
            q = self.users.get(e.user_id)
            if q is None:
                q = self.users[e.user_id] = deque(maxlen=self.max_events)
                if len(self.users) > self.max_users:
                    self.users.popitem(last=False)
                    self.evicted_users += 1
            else:
                self.users.move_to_end(e.user_id)
            q.append((sys.intern(e.item_id), e.type))
            if e.query and e.type != VIEW:  # a search that led somewhere: clicks, carts, purchases
                self.query_counts[e.query] = self.query_counts.get(e.query, 0.0) + 1.0
                for listener in self.query_listeners:
                    listener(e.query, 1.0)
            self.item_counts[e.item_id] = self.item_counts.get(e.item_id, 0.0) + EVENT_WEIGHT.get(e.type, 0.0)

    def apply_upserts(self, items: list[dict[str, Any]]) -> None:
        for it in items:
            self.items[it["item_id"]] = it

    def apply_rules(self, records: list[dict[str, Any]]) -> None:
        """Rule puts ({..rule..}) and deletes ({"rule_id": id, "deleted": true})."""
        for r in records:
            if r.get("deleted"):
                self.rules.pop(r["rule_id"], None)
            else:
                self.rules[r["rule_id"]] = r
        self.rules_version += 1

    def apply_campaigns(self, records: list[dict[str, Any]]) -> None:
        for c in records:
            self.campaigns[c["campaign_id"]] = c
        self.campaigns_version += 1

    def apply_deletes(self, item_ids: list[str]) -> None:
        for i in item_ids:
            self.items[i] = None

    # --- reads -------------------------------------------------------------------------------
    def user_events(self, user_id: str) -> list[tuple[str, int]]:
        q = self.users.get(user_id)
        return list(q) if q else []

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def bytes_per_user(max_events: int) -> int:
    """Memory of one user's full state: dict slot + key + deque + max_events (item_id, type) tuples.
    Item ids are interned, so they are shared with the catalog and not counted per event."""
    q: deque = deque(maxlen=max_events)
    for i in range(max_events):
        q.append(("x", i % 4 + 1))
    per_tuple = sys.getsizeof(("x", 1))
    return sys.getsizeof(q) + max_events * per_tuple + sys.getsizeof("user-000000000") + 2 * 8 * 3

