"""The state-store interface and its sequence tokens.

A sequence token names a point in the ordered catalog-change log: `"<major>-<minor>"` (a Redis stream id,
or `0-<record number>` for the local log). Tokens compare as integer pairs. A write returns the token of
its change; a read that carries one is answered only once this replica has applied every change up to it.
"""
from __future__ import annotations

import os
import re
from typing import Any

from server.errors import Unavailable
from server.state import Event, LiveState

TOKEN = re.compile(r"^(\d{1,20})-(\d{1,20})$")
ZERO = "0-0"


class StoreError(Exception):
    """The store cannot be used at start (unreachable, refused credentials): the server does not start."""


class StoreUnavailable(Unavailable):
    """The store did not take a write: nothing of the request was recorded (UNAVAILABLE; retry later)."""


def parse_token(token: str) -> tuple[int, int]:
    """(major, minor) of a sequence token; ValueError when it is not one."""
    m = TOKEN.match(token)
    if m is None:
        raise ValueError(f"not a sequence token: {token!r} (expected <number>-<number>)")
    return int(m.group(1)), int(m.group(2))


class StateStore:
    """Durable, ordered record of every write, and the per-user state reads need.

    Subclasses keep `live` (the in-memory view: catalog changes, counters, a cache of users' recent events)
    up to date with what they record. `shared` tells whether other processes write to the same store (then
    the replica tails it to learn their changes)."""

    kind = "none"
    shared = False

    def __init__(self, live: LiveState) -> None:
        self.live = live
        self.up = True  # False while the store cannot be reached (reads answer from `live`)
        self.stale_reads = 0  # reads answered from the local view because the store was unreachable
        self.write_failures = 0  # writes refused with UNAVAILABLE because the store was unreachable
        self._secrets: dict[str, bytes] = {}

    @property
    def url(self) -> str:
        """Where the state lives, for logs and GetInfo (never with a password)."""
        return ""

    async def open(self) -> None:
        """Connect and load the current state into `live` (before the first bundle is built)."""

    async def record_events(self, events: list[Event]) -> list[Event]:
        """Durably record one request's events (idempotent by event id); returns the fresh ones."""
        raise NotImplementedError

    async def user_events(self, user_id: str) -> list[tuple[str, int]]:
        """The user's recent (item_id, type), oldest first."""
        raise NotImplementedError

    async def append_catalog(self, kind: str, payload: list[Any]) -> str:
        """Durably record a catalog change ("upsert": item dicts, "delete": item ids, "rules": merchandising rule
        records, "campaigns": ad campaign records); returns its token."""
        raise NotImplementedError

    async def last_token(self) -> str:
        """The token of the newest recorded catalog change."""
        raise NotImplementedError

    async def secret(self, name: str) -> bytes:
        """A random 32-byte key made once and kept with the state (every replica reads the same one); the
        page-token key. This base class keeps it for the life of the process."""
        if name not in self._secrets:
            self._secrets[name] = os.urandom(32)
        return self._secrets[name]

    # --- sponsored products: counters the fleet shares (server.ads.ledger) ----------------------------
    async def ads_serve(self, user: str, day: int, wins: list[tuple[str, int]]) -> list[bool]:
        """Count ads served to a user (campaign id, frequency cap); False where serving it would pass its cap.
        This base keeps the counts in this process (the local store's fleet is this process)."""
        return self.live.ads.serve(user, wins, day)

    async def ads_caps(self, user: str, day: int) -> dict[str, int]:
        """campaign id -> ads of it served to the user on that day."""
        return dict(self.live.ads.user_caps.get((user, day), {}))

    async def ads_report(self, campaign_ids: list[str], first: int, last: int) -> dict[str, dict[int, list[float]]]:
        """campaign id -> day -> [served, impressions, clicks, spend, unbilled clicks]."""
        return self.live.ads.report(campaign_ids, first, last)

    def info(self) -> dict[str, Any]:
        """Figures for GetInfo and metrics."""
        return {"backend": self.kind, "url": self.url, "up": self.up, "log_bytes": 0}

    async def close(self) -> None:
        pass
