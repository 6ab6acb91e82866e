"""The shared store: Redis (or anything that speaks its protocol: Valkey, a managed Redis), for a fleet.

Keys, all under `--state-prefix` (default `searchrec`):

    P:events    stream   one entry per Feedback request (its fresh events), in acknowledgement order
    P:catalog   stream   one entry per UpsertItems / DeleteItems; the entry id is the sequence token
    P:control   stream   fleet bundle rollouts (prepare / commit / abort)
    P:items     hash     item id -> its latest upserted fields ("" = deleted): the catalog snapshot
    P:counts    hash     item id -> live popularity (atomic HINCRBYFLOAT)
    P:u:<user>  list     the user's last `max_user_events` "item|type", with a TTL (bounded per-user state)
    P:eid:<id>  string   seen event ids, with a TTL (idempotent Feedback across replicas)
    P:replicas  hash     replica id -> its heartbeat: address, bundle version, applied tokens (consumer progress)
    P:bundle    hash     the bundle the fleet serves (path, version, rollout)
    P:campaigns hash     campaign id -> its record (sponsored products; changes go through P:catalog too)
    P:ads:c:<id> hash    a campaign's counters: "<day>|served|imp|clk|spend|unbilled", "total|spend"
    P:ads:a:<auction> string  a charged auction (one charge per auction), with a TTL
    P:ads:cap:<user>:<day> hash  ads of each campaign served to the user that day (frequency caps), with a TTL
    P:rollout:<n> hash   each replica's vote on rollout n

A write is one Lua script (atomic: the stream entry and the state it changes land together) and is
acknowledged after Redis answers; with `appendonly yes` + `appendfsync always` Redis has fsynced it to its
append-only file by then. Reads of a user's state go to Redis, so a write acknowledged by any replica is seen
by the next read on every replica; the catalog and counters are applied locally from the streams.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any, AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from server.ads.ledger import CLICK_WINDOW_DAYS
from server.state import CLICK, EVENT_WEIGHT, VIEW, Event, LiveState
from server.store.base import ZERO, StateStore, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

# KEYS: events stream, counts hash, n event-id keys, n user-list keys, n auction keys, n campaign-stats keys.
# ARGV: event-id ttl, max events per user, user ttl, origin, n, auction ttl, then per event: item, type, weight,
# record json, ad kind ("" | imp | clk), chargeable (1 | 0), price, day, daily budget, total budget, event id.
# An ad click is charged (in the same script as the event, so both land or neither) when its auction was not
# charged yet and the campaign's spend for the auction's day and in total are below its budgets.
FEEDBACK = """
local n = tonumber(ARGV[5])
local fresh, recs, charged = {}, {}, {}
for i = 1, n do
  local b = 6 + (i - 1) * 11
  if redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', ARGV[1]) then
    local ukey = KEYS[2 + n + i]
    redis.call('RPUSH', ukey, ARGV[b + 1] .. '|' .. ARGV[b + 2])
    redis.call('LTRIM', ukey, -tonumber(ARGV[2]), -1)
    redis.call('EXPIRE', ukey, ARGV[3])
    redis.call('HINCRBYFLOAT', KEYS[2], ARGV[b + 1], ARGV[b + 3])
    fresh[#fresh + 1] = i
    recs[#recs + 1] = ARGV[b + 4]
    local ad, stats, day = ARGV[b + 5], KEYS[2 + 3 * n + i], ARGV[b + 8]
    if ad == 'imp' then
      redis.call('HINCRBY', stats, day .. '|imp', 1)
    elseif ad == 'clk' then
      local akey = KEYS[2 + 2 * n + i]
      local done = redis.call('EXISTS', akey) == 1
      local ok = false
      if ARGV[b + 6] == '1' and not done then
        local sd = tonumber(redis.call('HGET', stats, day .. '|spend') or '0')
        local st = tonumber(redis.call('HGET', stats, 'total|spend') or '0')
        local daily, total = tonumber(ARGV[b + 9]), tonumber(ARGV[b + 10])
        if sd < daily and (total <= 0 or st < total) then
          redis.call('SET', akey, '1', 'EX', ARGV[6])
          redis.call('HINCRBYFLOAT', stats, day .. '|spend', ARGV[b + 7])
          redis.call('HINCRBYFLOAT', stats, 'total|spend', ARGV[b + 7])
          redis.call('HINCRBY', stats, day .. '|clk', 1)
          charged[#charged + 1] = ARGV[b + 11]
          ok = true
        end
      end
      if not ok and not done then
        redis.call('HINCRBY', stats, day .. '|unbilled', 1)
      end
    end
  end
end
local id = ''
if #recs > 0 then
  id = redis.call('XADD', KEYS[1], '*', 'origin', ARGV[4], 'kind', 'feedback', 'events', '[' .. table.concat(recs, ',') .. ']',
                  'charged', cjson.encode(charged))
end
return {id, fresh, cjson.encode(charged)}
"""

# KEYS: the user's cap hash for the day, then one campaign-stats key per ad. ARGV: cap ttl, day, then per ad:
# campaign id, frequency cap (0 = none). An ad that would pass its cap is not counted and answers 0.
SERVE = """
local out = {}
for i = 1, #KEYS - 1 do
  local cid, cap = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  local ok = 1
  if cap > 0 then
    local n = redis.call('HINCRBY', KEYS[1], cid, 1)
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    if n > cap then
      redis.call('HINCRBY', KEYS[1], cid, -1)
      ok = 0
    end
  end
  if ok == 1 then
    redis.call('HINCRBY', KEYS[1 + i], ARGV[2] .. '|served', 1)
  end
  out[i] = ok
end
return out
"""

# KEYS: catalog stream, items hash. ARGV: origin, kind, payload json, then pairs item id, item json ("" = deleted).
CATALOG = """
local id = redis.call('XADD', KEYS[1], '*', 'origin', ARGV[1], 'kind', ARGV[2], 'payload', ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return id
"""

ERRORS = (RedisError, OSError, asyncio.TimeoutError)
HEARTBEAT_S = 1.0
FRESH_S = 5.0  # a replica whose heartbeat is older than this is not counted as part of the fleet
FORGET_S = 3600.0  # ... and one this silent is removed from the registry


def redact(url: str) -> str:
    """The URL without its password (for logs, GetInfo and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class RedisStore(StateStore):
    kind = "redis"
    shared = True

    def __init__(self, config, live: LiveState) -> None:
        super().__init__(live)
        self.config = config
        self.p = config.state_prefix
        self.origin = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        kwargs: dict[str, Any] = {"decode_responses": True, "protocol": 2, "socket_connect_timeout": 2.0}
        if config.state_username:
            kwargs["username"] = config.state_username
        if config.state_password:
            kwargs["password"] = config.state_password
        if config.state_tls_ca is not None:
            kwargs["ssl_ca_certs"] = str(config.state_tls_ca)
        self._url = config.state
        # Commands fail within a few seconds when Redis is gone; the tail blocks on XREAD, so it has its own
        # connection without a read timeout.
        self.r = aioredis.Redis.from_url(config.state, socket_timeout=2.0, **kwargs)
        self.tail_r = aioredis.Redis.from_url(config.state, socket_timeout=None, **kwargs)
        self._feedback = self.r.register_script(FEEDBACK)
        self._catalog = self.r.register_script(CATALOG)
        self._serve = self.r.register_script(SERVE)
        self.ids = {"events": ZERO, "catalog": ZERO, "control": ZERO}  # where the tail reads on from
        self.active: dict[str, str] = {}  # the fleet's bundle at open (path, version, rollout)
        self.snapshot_token = ZERO  # the catalog position the snapshot read at open stands at
        self.persistence = ""
        self._closed = False

    def key(self, name: str) -> str:
        return f"{self.p}:{name}"

    @property
    def url(self) -> str:
        return redact(self._url)

    # --- start --------------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await self.r.ping()
        except ERRORS as exc:
            raise StoreError(f"cannot reach the state store {self.url}: {exc}") from exc
        try:
            conf = await self.r.config_get("append*")
            self.persistence = f"appendonly={conf.get('appendonly')}, appendfsync={conf.get('appendfsync')}"
            if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
                log.warning("state store %s has %s: an acknowledged write may be lost if Redis crashes "
                            "(set appendonly yes, appendfsync always)", self.url, self.persistence)
        except ResponseError:  # managed services often disable CONFIG
            self.persistence = "unknown (CONFIG not allowed)"
        # One consistent snapshot: the catalog and counters as of the stream positions read with them.
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key("items"))
            pipe.xrevrange(self.key("catalog"), count=1)
            pipe.hgetall(self.key("counts"))
            pipe.xrevrange(self.key("events"), count=1)
            pipe.xrevrange(self.key("control"), count=1)
            pipe.hgetall(self.key("bundle"))
            pipe.hgetall(self.key("rules"))
            pipe.hgetall(self.key("campaigns"))
            items, cat, counts, ev, ctl, bundle, rules, campaigns = await pipe.execute()
        for item_id, value in items.items():
            self.live.items[item_id] = json.loads(value) if value else None
        self.live.item_counts.update({k: float(v) for k, v in counts.items()})
        self.live.apply_rules([json.loads(v) for v in rules.values() if v])
        self.live.apply_campaigns([json.loads(v) for v in campaigns.values()])
        if campaigns:  # serving reads spend from this replica's ledger: start it from the store's counters
            await self._load_spend(list(campaigns))
        for name, last in (("catalog", cat), ("events", ev), ("control", ctl)):
            self.ids[name] = last[0][0] if last else ZERO
        self.active = bundle
        self.snapshot_token = self.ids["catalog"]
        log.info("state store %s (%s): %d catalog changes, %d counted items, at catalog %s",
                 self.url, self.persistence, len(items), len(counts), self.snapshot_token)

    # --- writes -------------------------------------------------------------------------------
    def _refused(self, what: str, exc: BaseException) -> StoreUnavailable:
        self.write_failures += 1
        self.up = False
        return StoreUnavailable(f"the state store {self.url} did not take the {what} ({type(exc).__name__}: {exc}); "
                                "nothing was acknowledged, retry later")

    async def record_events(self, events: list[Event]) -> list[Event]:
        if not events:
            return []
        n = len(events)
        ads = self.live.ads
        keys = [self.key("events"), self.key("counts")]
        keys += [self.key(f"eid:{e.event_id}") for e in events]
        keys += [self.key(f"u:{e.user_id}") for e in events]
        keys += [self.key(f"ads:a:{e.auction_id}") if e.ad is not None else self.key("ads:none") for e in events]
        keys += [self.key(f"ads:c:{e.ad[0]}") if e.ad is not None else self.key("ads:none") for e in events]
        ttl = int(self.config.ads_day_s * 3)
        args: list[Any] = [self.config.event_id_ttl_s, self.config.max_user_events, self.config.user_state_ttl_s,
                           self.origin, n, ttl]
        for e in events:
            kind, chargeable, price, day, daily, total = "", "0", 0.0, 0, 0.0, 0.0
            if e.ad is not None and e.type in (VIEW, CLICK):
                campaign = self.live.campaigns.get(e.ad[0])
                kind, price, day = ("imp" if e.type == VIEW else "clk"), e.ad[1], e.ad[2]
                if campaign is not None and ads.clock.day(e.timestamp_ms) <= day + CLICK_WINDOW_DAYS:
                    chargeable, daily, total = "1", campaign["daily_budget"], campaign["total_budget"]
            args += [e.item_id, e.type, EVENT_WEIGHT.get(e.type, 0.0), _json(e.record()), kind, chargeable, price, day,
                     daily, total, e.event_id]
        try:
            _id, fresh_idx, charged = await self._feedback(keys=keys, args=args)
        except ERRORS as exc:
            raise self._refused("events", exc) from exc
        fresh = [events[int(i) - 1] for i in fresh_idx]
        # this replica's view at once (the store's charging decisions); the others read them from the stream
        self.live.apply_events(fresh, set(json.loads(charged) if charged not in ("{}", "") else []))
        return fresh

    async def append_catalog(self, kind: str, payload: list[Any]) -> str:
        args: list[Any] = [self.origin, kind, _json(payload)]
        if kind == "upsert":
            for it in payload:
                args += [it["item_id"], _json(it)]
        elif kind == "rules":  # the rules hash holds the current rules; a deleted rule's value is ""
            for r in payload:
                args += [r["rule_id"], "" if r.get("deleted") else _json(r)]
        elif kind == "campaigns":
            for c in payload:
                args += [c["campaign_id"], _json(c)]
        else:
            for item_id in payload:
                args += [item_id, ""]
        table = self.key({"rules": "rules", "campaigns": "campaigns"}.get(kind, "items"))
        try:
            return await self._catalog(keys=[self.key("catalog"), table], args=args)
        except ERRORS as exc:
            raise self._refused("catalog change", exc) from exc

    async def secret(self, name: str) -> bytes:
        """Made by the first replica that asks (SET NX), read by the others."""
        key = self.key(f"secret:{name}")
        await self.r.set(key, os.urandom(32).hex(), nx=True)
        return bytes.fromhex(await self.r.get(key))

    # --- sponsored products --------------------------------------------------------------------
    async def ads_serve(self, user: str, day: int, wins: list[tuple[str, int]]) -> list[bool]:
        if not wins:
            return []
        keys = [self.key(f"ads:cap:{user}:{day}") if user else self.key("ads:none")]
        keys += [self.key(f"ads:c:{cid}") for cid, _ in wins]
        args: list[Any] = [int(self.config.ads_day_s * 2), day]
        for cid, cap in wins:
            args += [cid, cap if user else 0]
        try:
            oks = await self._serve(keys=keys, args=args)
        except ERRORS as exc:  # no counting, no ads: an ad served past a cap cannot be taken back
            log.warning("state store %s unreachable (%s): no ads served", self.url, exc)
            self.up = False
            return [False] * len(wins)
        return [bool(int(v)) for v in oks]

    async def ads_caps(self, user: str, day: int) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in (await self.r.hgetall(self.key(f"ads:cap:{user}:{day}"))).items()}
        except ERRORS:
            return {}  # the serve script refuses capped ads anyway (and serves none while the store is down)

    async def _stats(self, campaign_ids: list[str]) -> list[dict[str, str]]:
        async with self.r.pipeline(transaction=False) as pipe:
            for cid in campaign_ids:
                pipe.hgetall(self.key(f"ads:c:{cid}"))
            return await pipe.execute()

    async def ads_report(self, campaign_ids: list[str], first: int, last: int) -> dict[str, dict[int, list[float]]]:
        fields = {"served": 0, "imp": 1, "clk": 2, "spend": 3, "unbilled": 4}
        out: dict[str, dict[int, list[float]]] = {}
        for cid, h in zip(campaign_ids, await self._stats(campaign_ids)):
            days: dict[int, list[float]] = {}
            for name, value in h.items():
                day, _, what = name.partition("|")
                if day == "total" or what not in fields or not first <= int(day) <= last:
                    continue
                days.setdefault(int(day), [0, 0, 0, 0.0, 0])[fields[what]] = float(value)
            out[cid] = days
        return out

    async def _load_spend(self, campaign_ids: list[str]) -> None:
        ads = self.live.ads
        for cid, h in zip(campaign_ids, await self._stats(campaign_ids)):
            for name, value in h.items():
                day, _, what = name.partition("|")
                if name == "total|spend":
                    ads.spent_total[cid] = float(value)
                elif what in ("spend", "clk", "unbilled", "imp"):
                    ads.row(cid, int(day))[{"imp": 1, "clk": 2, "spend": 3, "unbilled": 4}[what]] = float(value)

    # --- reads --------------------------------------------------------------------------------
    async def user_events(self, user_id: str) -> list[tuple[str, int]]:
        if self.up:
            try:
                values = await self.r.lrange(self.key(f"u:{user_id}"), 0, -1)
                out = []
                for v in values:
                    item, _, kind = v.rpartition("|")
                    out.append((item, int(kind)))
                return out
            except ERRORS as exc:
                log.warning("state store %s unreachable (%s): reads answer from this replica's last known state",
                            self.url, exc)
                self.up = False
        self.stale_reads += 1
        return self.live.user_events(user_id)

    async def changes(self, after: str, until: str, count: int = 500) -> list[tuple[str, str, str, list[Any]]]:
        """Catalog changes after `after` up to `until` (inclusive): (token, origin, kind, payload)."""
        entries = await self.r.xrange(self.key("catalog"), min=f"({after}", max=until, count=count)
        return [(eid, f["origin"], f["kind"], json.loads(f["payload"])) for eid, f in entries]

    async def last_token(self) -> str:
        last = await self.r.xrevrange(self.key("catalog"), count=1)
        return last[0][0] if last else ZERO

    async def tail(self) -> AsyncIterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
        """(stream name, entries) as they arrive on the event, catalog and control streams, for ever;
        reconnects by itself (and marks the store down meanwhile)."""
        names = {self.key(n): n for n in self.ids}
        while not self._closed:
            try:
                resp = await self.tail_r.xread({self.key(n): i for n, i in self.ids.items()}, block=1000, count=500)
            except ERRORS as exc:
                if self._closed:
                    return
                if self.up:
                    log.warning("state store %s unreachable (%s); retrying", self.url, exc)
                self.up = False
                await asyncio.sleep(0.5)
                continue
            if not self.up:
                log.info("state store %s reachable again", self.url)
            self.up = True
            for stream, entries in resp or []:
                name = names[stream]
                self.ids[name] = entries[-1][0]
                yield name, entries

    # --- the fleet: heartbeats, bundle rollouts -------------------------------------------------
    async def heartbeat(self, info: dict[str, Any]) -> None:
        await self.r.hset(self.key("replicas"), self.origin, _json({**info, "ts": time.time()}))

    async def leave(self) -> None:
        await self.r.hdel(self.key("replicas"), self.origin)

    async def replicas(self) -> dict[str, dict[str, Any]]:
        """The replicas whose heartbeat is fresh: id -> what they last reported."""
        now = time.time()
        out, gone = {}, []
        for rid, value in (await self.r.hgetall(self.key("replicas"))).items():
            info = json.loads(value)
            info["age_s"] = max(now - info.get("ts", 0), 0.0)
            if info["age_s"] <= FRESH_S:
                out[rid] = info
            elif info["age_s"] > FORGET_S:
                gone.append(rid)  # killed without a goodbye long ago
        if gone:
            await self.r.hdel(self.key("replicas"), *gone)
        return out

    async def publish_control(self, fields: dict[str, str]) -> str:
        return await self.r.xadd(self.key("control"), {**fields, "origin": self.origin})

    async def next_rollout(self) -> str:
        return str(await self.r.incr(self.key("rollout:seq")))

    async def vote(self, rollout: str, value: str) -> None:
        key = self.key(f"rollout:{rollout}")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, self.origin, value)
            pipe.expire(key, 86400)
            await pipe.execute()

    async def votes(self, rollout: str) -> dict[str, str]:
        return await self.r.hgetall(self.key(f"rollout:{rollout}"))

    async def set_active(self, path: str, version: str, rollout: str) -> None:
        await self.r.hset(self.key("bundle"), mapping={"path": path, "version": version, "rollout": rollout})

    def info(self) -> dict[str, Any]:
        return {**super().info(), "persistence": self.persistence}

    async def close(self) -> None:
        self._closed = True
        for client in (self.r, self.tail_r):
            try:
                await client.aclose()
            except ERRORS:
                pass
