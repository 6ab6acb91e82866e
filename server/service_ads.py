"""The sponsored-products part of the gRPC service: campaign RPCs, sponsored slots for Search / Recommend /
SimilarItems, and ad events in Feedback (protobuf <-> server.ads).

`AdsRpcs` is mixed into `server.service.SearchRecommendService`, which wraps its handlers with the service's error
mapping. Access: the ads role (server.access); a caller whose token names an advertiser reaches that advertiser's
campaigns only (PERMISSION_DENIED otherwise).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from common.suggest import phrase_key
from common.text import normalise_path
from server.ads.auction import MAX_SLOTS
from server.ads.campaigns import MAX_CAMPAIGNS, MAX_CATEGORIES, MAX_ITEMS, MAX_KEYWORDS
from server.ads.ledger import CLICKS, IMPS, SERVED, SPEND, UNBILLED
from server.ads.serving import AdServer, Candidates, Sponsored, user_interest
from server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.fields import id_list, text_field
from server.stubs import pb
from server.types import Hit

MAX_KEYWORD_CHARS = 200
MAX_BUDGET = 1e9
MAX_REPORT_DAYS = 366
STATUS = {0: "active", 1: "paused"}
MATCH = {0: "broad", 1: "phrase", 2: "exact"}


def _money(value: float, field: str, *, minimum: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite amount >= 0, got {value}", field=field)
    if value < minimum:
        raise InvalidArgument(f"{field} ({value:g}) must be at least {what} ({minimum:g})", field=field)
    if value > MAX_BUDGET:
        raise InvalidArgument(f"{field} ({value:g}) must be at most {MAX_BUDGET:g}", field=field)
    return round(float(value), 6)


class AdsRpcs:
    """Campaign RPCs and the sponsored part of the read RPCs (mixed into SearchRecommendService)."""

    holder: object
    gatekeeper: object

    # --- who asks ------------------------------------------------------------------------------
    def _advertiser_scope(self, context) -> str:
        """"" (every advertiser: no tokens, or ad operations) or the one advertiser the caller's token names."""
        gate = getattr(self, "gatekeeper", None)
        caller = gate.caller(context.invocation_metadata()) if gate is not None else None
        return caller.advertiser if caller is not None else ""

    def _ads(self) -> AdServer:
        ads = self.holder.ads
        if ads is None:
            raise FailedPrecondition("this server was started without --state-dir or --state, so it cannot bill ads; "
                                     "restart it with --state-dir DIR (or --state redis://...)", field="state_dir")
        return ads

    # --- campaigns -----------------------------------------------------------------------------
    def _campaign(self, c, f: str, catalog, scope: str, now_ms: int) -> dict:
        """pb.Campaign -> the record the log and the store keep (validated whole)."""
        cfg = self.holder.config
        cid = text_field(c.campaign_id, f"{f}.campaign_id", 128, required=True)
        advertiser = text_field(c.advertiser, f"{f}.advertiser", 128, required=True)
        if scope and advertiser != scope:
            raise PermissionDenied(f"{f}.advertiser {advertiser!r}: this token manages advertiser {scope!r} only",
                                   field=f"{f}.advertiser")
        old = self.holder.live.campaigns.get(cid)
        if old is not None and old["advertiser"] != advertiser:
            if scope:
                raise PermissionDenied(f"{f}.campaign_id {cid!r} belongs to another advertiser", field=f"{f}.campaign_id")
            raise InvalidArgument(f"{f}.advertiser: campaign {cid!r} belongs to {old['advertiser']!r}; a campaign "
                                  "never changes advertiser", field=f"{f}.advertiser")
        if not 1 <= len(c.item_ids) <= MAX_ITEMS:
            raise InvalidArgument(f"{f}.item_ids has {len(c.item_ids)} items; give 1..{MAX_ITEMS}", field=f"{f}.item_ids")
        items = list(dict.fromkeys(id_list(c.item_ids, f"{f}.item_ids", MAX_ITEMS)))
        for j, item in enumerate(items):
            if item not in catalog.id_to_row:
                raise InvalidArgument(f"{f}.item_ids[{j}] {item!r} is not in the catalog; no campaign of this request "
                                      "was stored", field=f"{f}.item_ids[{j}]")
        max_cpc = _money(c.max_cpc, f"{f}.max_cpc", minimum=cfg.ads_reserve_cpc, what="the reserve price")
        daily = _money(c.daily_budget, f"{f}.daily_budget", minimum=max_cpc, what="max_cpc: one click")
        total = 0.0
        if c.total_budget != 0:
            total = _money(c.total_budget, f"{f}.total_budget", minimum=daily, what="daily_budget")
        if c.start_ms < 0 or c.end_ms < 0:
            field = f"{f}.start_ms" if c.start_ms < 0 else f"{f}.end_ms"
            raise InvalidArgument(f"{field} must be >= 0 (milliseconds since the epoch; 0 = unset)", field=field)
        start = c.start_ms or (old["start_ms"] if old is not None else now_ms)
        if c.end_ms and c.end_ms <= start:
            raise InvalidArgument(f"{f}.end_ms ({c.end_ms}) must be after start_ms ({start})", field=f"{f}.end_ms")
        if c.status not in STATUS:
            raise InvalidArgument(f"{f}.status must be ACTIVE or PAUSED, got {c.status}", field=f"{f}.status")
        if len(c.keywords) > MAX_KEYWORDS or len(c.negative_keywords) > MAX_KEYWORDS:
            field = f"{f}.keywords" if len(c.keywords) > MAX_KEYWORDS else f"{f}.negative_keywords"
            raise InvalidArgument(f"{field} has more than {MAX_KEYWORDS} entries", field=field)
        keywords = []
        for j, k in enumerate(c.keywords):
            kf = f"{f}.keywords[{j}]"
            key = phrase_key(text_field(k.text, f"{kf}.text", MAX_KEYWORD_CHARS, required=True))
            if not key:
                raise InvalidArgument(f"{kf}.text has no words", field=f"{kf}.text")
            if k.match not in MATCH:
                raise InvalidArgument(f"{kf}.match must be BROAD, PHRASE or EXACT, got {k.match}", field=f"{kf}.match")
            keywords.append([key, MATCH[k.match]])
        negatives = []
        for j, n in enumerate(c.negative_keywords):
            key = phrase_key(text_field(n, f"{f}.negative_keywords[{j}]", MAX_KEYWORD_CHARS, required=True))
            if not key:
                raise InvalidArgument(f"{f}.negative_keywords[{j}] has no words", field=f"{f}.negative_keywords[{j}]")
            negatives.append(key)
        if len(c.categories) > MAX_CATEGORIES:
            raise InvalidArgument(f"{f}.categories has {len(c.categories)} entries; the limit is {MAX_CATEGORIES}",
                                  field=f"{f}.categories")
        categories = [normalise_path(text_field(v, f"{f}.categories[{j}]", 200, required=True)).lower()
                      for j, v in enumerate(c.categories)]
        aud = c.audience_min_interest
        if not (math.isfinite(aud) and 0 <= aud <= 1):
            raise InvalidArgument(f"{f}.audience_min_interest must be in [0, 1] (a cosine; 0 = everyone), got {aud}",
                                  field=f"{f}.audience_min_interest")
        if not 0 <= c.frequency_cap <= 1000:
            raise InvalidArgument(f"{f}.frequency_cap must be in 0..1000 (ads per user per day; 0 = none), got "
                                  f"{c.frequency_cap}", field=f"{f}.frequency_cap")
        return {"campaign_id": cid, "advertiser": advertiser, "item_ids": items, "max_cpc": max_cpc,
                "daily_budget": daily, "total_budget": total, "start_ms": int(start), "end_ms": int(c.end_ms),
                "status": STATUS[c.status], "keywords": keywords, "negative_keywords": negatives,
                "categories": categories, "audience_min_interest": float(aud), "frequency_cap": int(c.frequency_cap),
                "created_ms": old["created_ms"] if old is not None else now_ms, "updated_ms": now_ms}

    def _campaign_pb(self, c: dict, now_ms: int) -> "pb.Campaign":
        ads = self.holder.ads
        day = ads.live.ads.clock.day(now_ms)
        out = pb.Campaign(
            campaign_id=c["campaign_id"], advertiser=c["advertiser"], item_ids=c["item_ids"], max_cpc=c["max_cpc"],
            daily_budget=c["daily_budget"], total_budget=c["total_budget"], start_ms=c["start_ms"], end_ms=c["end_ms"],
            status=1 if c["status"] == "paused" else 0, negative_keywords=c["negative_keywords"],
            categories=c["categories"], audience_min_interest=c["audience_min_interest"],
            frequency_cap=c["frequency_cap"],
            keywords=[pb.Keyword(text=t, match={"broad": 0, "phrase": 1, "exact": 2}[m]) for t, m in c["keywords"]],
            state=pb.CampaignState(serving=ads.state(c, now_ms), spent_today=ads.live.ads.spent(c["campaign_id"], day),
                                   spent_total=ads.live.ads.spent_total.get(c["campaign_id"], 0.0),
                                   created_ms=c["created_ms"], updated_ms=c["updated_ms"]))
        return out

    async def _write_campaigns(self, records: list[dict]) -> str:
        async with self.holder.catalog_lock:  # in the catalog's order: a sequence token covers campaigns too
            return await self.replica.write_catalog("campaigns", records, None)

    async def PutCampaigns(self, request, context):
        self._live()
        self._ads()
        self._batch_size(len(request.campaigns), "campaigns")
        scope = self._advertiser_scope(context)
        catalog = self.holder.current.bundle.items
        now = int(time.time() * 1000)
        records, seen = [], set()
        for i, c in enumerate(request.campaigns):
            rec = self._campaign(c, f"campaigns[{i}]", catalog, scope, now)
            if rec["campaign_id"] in seen:
                raise InvalidArgument(f"campaigns[{i}].campaign_id {rec['campaign_id']!r} appears twice in this request",
                                      field=f"campaigns[{i}].campaign_id")
            seen.add(rec["campaign_id"])
            records.append(rec)
        n = len(set(self.holder.live.campaigns) | seen)
        if n > MAX_CAMPAIGNS:
            raise InvalidArgument(f"campaigns would number {n}; the limit is {MAX_CAMPAIGNS}", field="campaigns")
        token = await self._write_campaigns(records)
        return pb.PutCampaignsResponse(put=len(records), sequence_token=token)

    def _own(self, campaign_id: str, field: str, scope: str) -> dict:
        c = self.holder.live.campaigns.get(campaign_id)
        if c is None:
            raise NotFound(f"{field} {campaign_id!r} is not a campaign", field=field)
        if scope and c["advertiser"] != scope:
            raise PermissionDenied(f"{field} {campaign_id!r} belongs to another advertiser", field=field)
        return c

    async def SetCampaignStatus(self, request, context):
        self._live()
        self._ads()
        cid = text_field(request.campaign_id, "campaign_id", 128, required=True)
        if request.status not in STATUS:
            raise InvalidArgument(f"status must be ACTIVE or PAUSED, got {request.status}", field="status")
        c = self._own(cid, "campaign_id", self._advertiser_scope(context))
        now = int(time.time() * 1000)
        rec = {**c, "status": STATUS[request.status], "updated_ms": now}
        token = await self._write_campaigns([rec])
        return pb.SetCampaignStatusResponse(campaign=self._campaign_pb(rec, now), sequence_token=token)

    def _visible(self, advertiser: str, scope: str) -> list[dict]:
        advertiser = text_field(advertiser, "advertiser", 128, required=False)
        if scope and advertiser and advertiser != scope:
            raise PermissionDenied(f"advertiser {advertiser!r}: this token manages advertiser {scope!r} only",
                                   field="advertiser")
        who = scope or advertiser
        live = self.holder.live
        return sorted((c for c in (live.campaigns.values() if live is not None else ())
                       if not who or c["advertiser"] == who), key=lambda c: c["campaign_id"])

    async def ListCampaigns(self, request, context):
        self._ads()
        now = int(time.time() * 1000)
        return pb.ListCampaignsResponse(campaigns=[self._campaign_pb(c, now) for c in
                                                   self._visible(request.advertiser, self._advertiser_scope(context))])

    async def AdsReport(self, request, context):
        ads = self._ads()
        scope = self._advertiser_scope(context)
        clock = ads.live.ads.clock
        today = clock.day(time.time() * 1000)
        days = []
        for name, value, default in (("from_day", request.from_day, 0), ("to_day", request.to_day, today)):
            value = text_field(value, name, 32, required=False)
            try:
                days.append(clock.parse(value) if value else default)
            except ValueError:
                raise InvalidArgument(f"{name} must be a day like {clock.name(today)}, got {value!r}", field=name)
        first, last = days
        if first > last:
            raise InvalidArgument(f"from_day ({request.from_day}) is after to_day ({clock.name(last)})", field="from_day")
        if request.campaign_ids:
            ids = id_list(request.campaign_ids, "campaign_ids", self.holder.config.max_write_batch)
            campaigns = [self._own(cid, f"campaign_ids[{i}]", scope) for i, cid in enumerate(ids)]
        else:
            campaigns = self._visible(request.advertiser, scope)
        stats = await self.holder.store.ads_report([c["campaign_id"] for c in campaigns], first, last)
        rows = []
        for c in campaigns:
            for day, r in sorted(stats.get(c["campaign_id"], {}).items()):
                clicks, imps, spend = int(r[CLICKS]), int(r[IMPS]), float(r[SPEND])
                rows.append(pb.AdsReportRow(
                    campaign_id=c["campaign_id"], advertiser=c["advertiser"], day=clock.name(day), served=int(r[SERVED]),
                    impressions=imps, clicks=clicks, ctr=clicks / imps if imps else 0.0, spend=round(spend, 6),
                    avg_cpc=round(spend / clicks, 6) if clicks else 0.0, unbilled_clicks=int(r[UNBILLED])))
        return pb.AdsReportResponse(rows=rows)

    # --- sponsored slots in the read RPCs ----------------------------------------------------------
    def _ad_slots(self, request) -> int:
        """The slots asked for (validated), 0 when ads cannot be served here."""
        requested = request.ad_slots if request.HasField("ad_slots") else None
        if requested is not None and not 0 <= requested <= MAX_SLOTS:
            raise InvalidArgument(f"ad_slots must be between 0 and {MAX_SLOTS}, got {requested}", field="ad_slots")
        ads = self.holder.ads
        if ads is None or not ads.live.campaigns:
            return 0
        return ads.slots(requested)

    async def _ad_candidates(self, bundle, campaign_ids: list[str], user_key: str,
                             history_rows: list[int] | None = None) -> Candidates | None:
        """Eligible campaigns' promoted rows; reads the user's caps and history from the store only when a
        campaign needs them."""
        ads = self.holder.ads
        store = self.holder.store
        live = ads.live
        matched = [c for c in (live.campaigns.get(cid) for cid in campaign_ids) if c is not None]
        caps: dict[str, int] = {}
        vector = None
        if user_key and any(c["audience_min_interest"] > 0 for c in matched):
            if history_rows is None:
                ids = bundle.items.id_to_row
                history_rows = [r for r in (ids.get(i) for i, _ in await store.user_events(user_key)) if r is not None]
            vector = user_interest(bundle, history_rows[-20:])
        if user_key and any(c["frequency_cap"] > 0 for c in matched):
            caps = await store.ads_caps(user_key, live.ads.clock.day(time.time() * 1000))
        return ads.candidates(bundle, [c["campaign_id"] for c in matched], caps, vector)

    async def _sell(self, bundle, cands: Candidates, rows: np.ndarray, relevance: np.ndarray, passes: np.ndarray,
                    organic_rank: np.ndarray, slots: int, organic_rows: list[int], exclude: set[int],
                    user_key: str) -> list[Sponsored]:
        """The auction over the candidates that passed the relevance floor; caps counted in the store."""
        ads = self.holder.ads
        items = bundle.items
        cats = {items.category_paths[c] for c in items.category_id[np.asarray(organic_rows[:3], np.int64)].tolist()
                if c >= 0} if organic_rows else set()
        keep = np.flatnonzero(passes)
        bids = ads.auction(bundle, cands, rows[keep], relevance[keep], organic_rank[keep], slots, cats, exclude)
        wins = ads.run(bids, slots, os.urandom(8).hex())
        if not wins:
            return []
        caps = [(w.bid.campaign_id, ads.live.campaigns[w.bid.campaign_id]["frequency_cap"]) for w in wins]
        allowed = await self.holder.store.ads_serve(user_key, cands.day, caps)
        sold = ads.sold(wins, cands.day, cands.now_ms, allowed)
        if self.metrics is not None:
            self.metrics.observe_ads(len(sold), sum(s.price for s in sold))
        return sold

    def _sponsored_pb(self, bundle, sold: list[Sponsored]) -> list:
        out = []
        for s in sold:
            item = self._scored(bundle, Hit(s.row, s.relevance))
            out.append(pb.SponsoredItem(item=item, slot=s.slot, auction_id=s.auction_id, campaign_id=s.campaign_id,
                                        advertiser=s.advertiser, cpc=s.price, pctr=s.pctr))
        return out

    async def _sponsored_by_vector(self, runtime, anchor: np.ndarray | None, organic: list[Hit], k: int, slots: int,
                                   campaign_ids: list[str], user_key: str, exclude: set[int],
                                   history_rows: list[int] | None = None,
                                   mask: np.ndarray | None = None) -> tuple[list[Hit], list[Sponsored]]:
        """Recommend and SimilarItems: relevance is the cosine to the anchor (the user's interest vector, or the
        source item); an ad must be as near as the organic item at the floor rank. Ad items leave the organic list
        (asked for k + slots), which is cut to k."""
        bundle = runtime.bundle
        if anchor is None or not slots:
            return organic[:k], []
        cands = await self._ad_candidates(bundle, campaign_ids, user_key, history_rows)
        if cands is None:
            return organic[:k], []
        vectors = bundle.vectors
        rel = vectors[cands.rows].astype(np.float32) @ anchor
        organic_rows = [h.row for h in organic]
        org = np.sort(vectors[np.asarray(organic_rows, np.int64)].astype(np.float32) @ anchor)[::-1] if organic else \
            np.zeros(0, np.float32)
        floor = org[min(self.holder.config.ads_floor_rank, len(org)) - 1] if len(org) else np.inf
        rank = 1 + np.searchsorted(-org, -rel, side="left")
        alive = mask[cands.rows] if mask is not None else np.ones(len(cands.rows), bool)  # filters, deletions
        sold = await self._sell(bundle, cands, cands.rows, rel.astype(np.float64), (rel >= floor) & alive, rank, slots,
                                organic_rows, exclude, user_key)
        taken = {s.row for s in sold}
        return [h for h in organic if h.row not in taken][:k], sold


def ad_event(ads: AdServer | None, auction_id: str, item_id: str, f: str) -> tuple:
    """Feedback: an event's auction id -> (campaign, price, day, slot), or InvalidArgument naming the field."""
    if len(auction_id) > 1024:
        raise InvalidArgument(f"{f}.auction_id is {len(auction_id)} characters; the limit is 1024", field=f"{f}.auction_id")
    if ads is None:
        raise FailedPrecondition(f"{f}.auction_id: this server serves no ads", field=f"{f}.auction_id")
    try:
        sold = ads.tokens.read(auction_id)
    except ValueError as exc:
        raise InvalidArgument(f"{f}.auction_id is refused: {exc}; nothing of this request was applied",
                              field=f"{f}.auction_id") from exc
    if sold.item_id != item_id:
        raise InvalidArgument(f"{f}.auction_id sold item {sold.item_id!r}, not {f}.item_id {item_id!r}; nothing of "
                              "this request was applied", field=f"{f}.auction_id")
    return (sold.campaign_id, sold.price, sold.day, sold.slot)

