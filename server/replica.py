"""One replica's part in the state it shares with others: catalog sync, sequence tokens, the event
stream, heartbeats and fleet-wide bundle rollouts.

With the local store this replica is the whole fleet: every write is applied before it is acknowledged
and a reload swaps this process only. With a shared store (Redis) it

- applies catalog changes in the store's order (its own included), pulled from the catalog stream, so every
  replica holds the same catalog; a read that carries a sequence token first pulls up to that token;
- counts the other replicas' feedback events into its live popularity, from the event stream;
- reports a heartbeat (address, version, applied tokens: its consumer progress) every second;
- runs a bundle rollout as prepare (every replica verifies and warms the bundle, then votes) -> commit
  (every replica swaps) or abort (nobody swaps; the caller gets the failing replica's reason).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.bundle import BundleError
from server.errors import DeadlineExpired, FailedPrecondition, InvalidArgument, Unavailable
from server.runtime import Runtime, RuntimeHolder, land_pending
from server.state import EVENT_WEIGHT, Event
from server.store import StateStore, parse_token
from server.store.base import ZERO

log = logging.getLogger(__name__)


class Replica:
    """Keeps one RuntimeHolder in step with its store."""

    def __init__(self, holder: RuntimeHolder, store: StateStore, address: str) -> None:
        self.holder = holder
        self.store = store
        self.address = address
        self.applied = ZERO  # the newest catalog change applied to the served runtime
        self._tasks: list[asyncio.Task] = []
        self._kick = asyncio.Event()  # the tail saw new catalog changes
        self._prepared: dict[str, asyncio.Task] = {}  # rollout -> task building its runtime
        self._swapped: dict[str, asyncio.Future] = {}  # rollout -> done when this replica swapped (or aborted)
        self.rollout_error = ""  # why the last rollout was aborted ("" = none)

    @property
    def shared(self) -> bool:
        return self.store.shared

    # --- start / stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Catch up on every change recorded so far, then follow the store (before SERVING)."""
        if not self.shared:
            self.applied = await self.store.last_token()
            return
        self.applied = self.store.snapshot_token  # the runtime was built from the snapshot at this point
        await self.sync_catalog(await self.store.last_token())
        await self.store.heartbeat(self.report())
        self._tasks = [asyncio.create_task(self._follow(), name="store-tail"),
                       asyncio.create_task(self._sync_loop(), name="catalog-sync"),
                       asyncio.create_task(self._heartbeat(), name="heartbeat")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.shared:
            try:
                await self.store.leave()
            except Exception:  # the store may be gone; the heartbeat then simply ages out
                pass

    def report(self) -> dict[str, Any]:
        rt = self.holder._current
        return {"address": self.address, "version": rt.version if rt is not None else "", "applied": self.applied,
                "events": self.store.ids["events"] if self.shared else "", "store_up": self.store.up}

    # --- catalog --------------------------------------------------------------------------------
    async def sync_catalog(self, until: str, own: dict[str, np.ndarray] | None = None) -> None:
        async with self.holder.catalog_lock:
            await self._sync_locked(until, own)

    async def _sync_locked(self, until: str, own: dict[str, np.ndarray] | None = None) -> None:
        target = parse_token(until)
        while parse_token(self.applied) < target:
            changes = await self.store.changes(self.applied, until)
            if not changes:
                break
            for token, _origin, kind, payload in changes:
                await self._apply(kind, payload, (own or {}).get(token))
                self.applied = token

    async def _apply(self, kind: str, payload: list[Any], vectors: np.ndarray | None) -> None:
        runtime, live = self.holder.current, self.holder.live
        loop = asyncio.get_running_loop()
        if kind == "rules":  # read at request time: nothing to rebuild
            live.apply_rules(payload)
        elif kind == "campaigns":
            live.apply_campaigns(payload)
        elif kind == "upsert":
            live.apply_upserts(payload)
            if vectors is None:
                from server.live import passage

                done = await runtime.encode_batcher.submit([passage(it) for it in payload], None)
                vectors = np.asarray(done.value, np.float32)
            await loop.run_in_executor(self.holder.compute, runtime.apply_live, payload, [], vectors, live.item_counts)
        else:
            live.apply_deletes(payload)
            empty = np.zeros((0, runtime.encoder.dims), np.float32)
            await loop.run_in_executor(self.holder.compute, runtime.apply_live, [], payload, empty, live.item_counts)

    async def write_catalog(self, kind: str, payload: list[Any], vectors: np.ndarray | None) -> str:
        """Record a catalog change and apply it here (in store order); returns its token. Hold catalog_lock."""
        token = await self.store.append_catalog(kind, payload)
        runtime = self.holder.current
        if not self.shared and kind in ("rules", "campaigns"):  # the local store applied them with the record
            self.applied = token
            return token
        if not self.shared:
            live = self.holder.live
            if vectors is None:
                vectors = np.zeros((0, runtime.encoder.dims), np.float32)
            ups, dels = (payload, []) if kind == "upsert" else ([], payload)
            await asyncio.get_running_loop().run_in_executor(
                self.holder.compute, runtime.apply_live, ups, dels, vectors, live.item_counts)
            self.applied = token
            return token
        try:
            await self._sync_locked(token, {token: vectors} if vectors is not None else None)
        except Exception as exc:  # recorded but not yet applied here: the sync loop lands it shortly
            log.warning("catalog change %s recorded; applying it here failed for now: %s", token, exc)
            self._kick.set()
        return token

    async def wait_for(self, token: str, field: str, deadline: float | None) -> None:
        """Return once this replica has applied every catalog change up to `token`."""
        try:
            wanted = parse_token(token)
        except ValueError as exc:
            raise InvalidArgument(f"{field}: {exc}", field=field) from exc
        if wanted <= parse_token(self.applied):
            return
        if not self.shared:
            raise InvalidArgument(f"{field} {token} is ahead of the newest change this server recorded "
                                  f"({self.applied})", field=field)
        try:
            newest = await self.store.last_token()
        except Exception as exc:
            raise Unavailable(f"{field}: the state store is unreachable, so this replica cannot tell whether it "
                              f"has applied {token} (it is at {self.applied})", field=field) from exc
        if wanted > parse_token(newest):
            raise InvalidArgument(f"{field} {token} is ahead of the newest change in the store ({newest}); "
                                  "it was not issued by this fleet", field=field)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait_for(self.sync_catalog(token), timeout)
        except asyncio.TimeoutError as exc:
            raise DeadlineExpired(f"the deadline passed before this replica applied {token} "
                                  f"(it is at {self.applied})", field=field) from exc

    async def _sync_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self.sync_catalog(self.store.ids["catalog"])
            except Exception as exc:  # store down: the tail kicks again when it is back
                log.warning("catalog sync: %s", exc)
                await asyncio.sleep(0.5)
                self._kick.set()

    # --- following the store ----------------------------------------------------------------------
    async def _follow(self) -> None:
        async for stream, entries in self.store.tail():
            try:
                if stream == "catalog":
                    self._kick.set()
                elif stream == "events":
                    self._count_events(entries)
                elif stream == "control":
                    for eid, fields in entries:
                        self._control(eid, fields)
            except Exception:
                log.exception("applying %s entries failed", stream)

    def _count_events(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Other replicas' events: live popularity and this replica's cache of users' recent events."""
        live = self.holder.live
        rt = self.holder._current
        for _eid, fields in entries:
            if fields.get("origin") == self.store.origin:
                continue  # applied when this replica recorded it
            events = [Event(**e) for e in json.loads(fields["events"])]
            live.apply_events(events, set(json.loads(fields.get("charged") or "[]")))
            if rt is not None and rt.rec is not None:
                ids = rt.bundle.items.id_to_row
                for ev in events:
                    row = ids.get(ev.item_id)
                    if row is not None and row < len(rt.rec.live_popularity):
                        rt.rec.live_popularity[row] += EVENT_WEIGHT.get(ev.type, 0.0)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.store.heartbeat(self.report())
            except Exception:
                pass  # store down: the tail reports it; the heartbeat resumes with it

    # --- fleet-wide bundle rollout --------------------------------------------------------------
    def _control(self, eid: str, f: dict[str, str]) -> None:
        kind, rollout = f.get("kind"), f.get("rollout", "")
        if kind == "prepare":
            self._prepared[rollout] = asyncio.create_task(self._prepare(rollout, Path(f["path"])))
        elif kind == "commit":
            self._tasks.append(asyncio.create_task(self._commit(rollout, Path(f["path"]))))
        elif kind == "abort":
            task = self._prepared.pop(rollout, None)
            if task is not None:
                task.cancel()
            self.rollout_error = f.get("reason", "")
            log.warning("rollout %s aborted: %s", rollout, self.rollout_error)
            self._done(rollout, FailedPrecondition(self.rollout_error, field="path"))

    async def _prepare(self, rollout: str, path: Path) -> Runtime | None:
        try:
            runtime = await self.holder._build(path)
        except (BundleError, OSError) as exc:
            log.warning("rollout %s: bundle %s refused here: %s", rollout, path, exc)
            await self.store.vote(rollout, f"error: {exc}")
            return None
        except Exception as exc:  # anything else still answers the vote: the fleet must not wait for a timeout
            log.exception("rollout %s: bundle %s failed to load here", rollout, path)
            await self.store.vote(rollout, f"error: {type(exc).__name__}: {exc}")
            return None
        await self.store.vote(rollout, f"ok {runtime.version}")
        log.info("rollout %s: %s verified and warm, waiting for the fleet", rollout, runtime.version)
        return runtime

    async def _commit(self, rollout: str, path: Path) -> None:
        task = self._prepared.pop(rollout, None)
        try:
            # A replica that joined after the prepare builds the bundle now.
            runtime = await task if task is not None else await self.holder._build(path)
            if runtime is None:
                raise BundleError(f"{path} could not be loaded here")
            async with self.holder.catalog_lock:
                # Changes that landed while the bundle was prepared are landed on it before it serves.
                await asyncio.get_running_loop().run_in_executor(self.holder.loader, land_pending, runtime,
                                                                 self.holder.live)
                await self.holder.swap(runtime, path)
        except Exception as exc:
            log.error("rollout %s: committed by the fleet but this replica could not swap: %s", rollout, exc)
            self._done(rollout, exc)
            return
        self._done(rollout, None)

    def _done(self, rollout: str, error: BaseException | None) -> None:
        fut = self._swapped.get(rollout)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def reload(self, path: Path | None) -> tuple[Runtime, Runtime, float]:
        """ReloadBundle: this replica alone (local store) or the whole fleet (shared store)."""
        if not self.shared:
            return await self.holder.reload(path)
        old = self.holder.current
        target = str(path or self.holder.source or old.bundle.path)
        started = time.perf_counter()
        async with self.holder._lock:
            try:
                rollout = await self.store.next_rollout()
                voters = set(await self.store.replicas())
            except Exception as exc:
                raise Unavailable(f"the state store is unreachable, so the fleet cannot roll out a bundle: {exc}",
                                  field="path") from exc
            fut = self._swapped[rollout] = asyncio.get_running_loop().create_future()
            await self.store.publish_control({"kind": "prepare", "rollout": rollout, "path": target})
            failed, versions = await self._collect_votes(rollout, voters)
            if not failed and len(versions) > 1:
                failed = [("fleet", f"replicas found different bundles at {target}: {sorted(versions)}")]
            if failed:
                reason = "; ".join(f"replica {r}: {why}" for r, why in failed)
                await self.store.publish_control({"kind": "abort", "rollout": rollout, "reason": reason})
                self._swapped.pop(rollout, None)
                raise FailedPrecondition(f"bundle refused, the whole fleet stays on {old.version}: {reason}",
                                         field="path")
            version = versions.pop()
            await self.store.set_active(target, version, rollout)
            await self.store.publish_control({"kind": "commit", "rollout": rollout, "path": target})
            try:
                await asyncio.wait_for(fut, self.holder.config.rollout_timeout_s)
            finally:
                self._swapped.pop(rollout, None)
        seconds = time.perf_counter() - started
        log.info("fleet rollout %s: %s -> %s in %.2fs (%d replicas)", rollout, old.version, version, seconds,
                 len(voters))
        return self.holder.current, old, seconds

    async def _collect_votes(self, rollout: str, voters: set[str]) -> tuple[list[tuple[str, str]], set[str]]:
        deadline = time.monotonic() + self.holder.config.rollout_timeout_s
        while True:
            votes = await self.store.votes(rollout)
            failed = [(r, v.removeprefix("error: ")) for r, v in votes.items() if not v.startswith("ok ")]
            versions = {v[3:] for v in votes.values() if v.startswith("ok ")}
            missing = voters - set(votes)
            if failed or not missing:
                return failed, versions
            alive = set(await self.store.replicas())
            gone = missing - alive
            if gone:
                return [(r, "stopped before it had loaded the bundle") for r in sorted(gone)], versions
            if time.monotonic() > deadline:
                return [(r, "did not load the bundle in time") for r in sorted(missing)], versions
            await asyncio.sleep(0.05)

    async def fleet(self) -> list[dict[str, Any]]:
        """Every replica's report (this one only, with the local store)."""
        if not self.shared:
            return [{"id": "local", **self.report(), "age_s": 0.0}]
        try:
            return [{"id": rid, **info} for rid, info in sorted((await self.store.replicas()).items())]
        except Exception:
            return [{"id": self.store.origin, **self.report(), "age_s": 0.0}]
