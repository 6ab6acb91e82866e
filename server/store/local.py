"""The embedded default: one process, its state in the fsync'd event log under --state-dir.

Every write is applied in this process before it is acknowledged, so a token this store hands out is
already applied when the caller gets it.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from server.state import Event, LiveState
from server.store.base import StateStore


class LocalStore(StateStore):
    kind = "local"
    shared = False

    def __init__(self, live: LiveState) -> None:
        super().__init__(live)
        self._lock = asyncio.Lock()  # one write at a time: duplicate checks + log order
        self.seq = live.replay_report.records  # records in the log: the token of the newest change

    @property
    def url(self) -> str:
        return str(self.live.log.path) if self.live.log is not None else ""

    async def record_events(self, events: list[Event]) -> list[Event]:
        async with self._lock:
            fresh, seen = [], set()
            for ev in events:  # idempotent by event_id, within the request and across requests
                if ev.event_id in seen or self.live.is_duplicate(ev.event_id):
                    continue
                seen.add(ev.event_id)
                fresh.append(ev)
            if fresh:
                await asyncio.get_running_loop().run_in_executor(None, self.live.record_events, fresh)  # fsync off the loop
                self.seq += 1
            return fresh

    async def user_events(self, user_id: str) -> list[tuple[str, int]]:
        return self.live.user_events(user_id)

    async def append_catalog(self, kind: str, payload: list[Any]) -> str:
        record = {"upsert": self.live.record_upserts, "delete": self.live.record_deletes,
                  "rules": self.live.record_rules, "campaigns": self.live.record_campaigns}[kind]
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, record, payload)
            self.seq += 1
            return f"0-{self.seq}"

    async def secret(self, name: str) -> bytes:
        """Kept in a 0600 file beside the log, so tokens outlive a restart."""
        log = self.live.log
        if log is None:
            return await super().secret(name)
        path = log.path.parent / f"{name}.key"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return path.read_bytes()

    async def last_token(self) -> str:
        return f"0-{self.seq}"

    def info(self) -> dict[str, Any]:
        log = self.live.log
        return {**super().info(), "log_bytes": log.size if log is not None else 0}

    async def close(self) -> None:
        self.live.close()
