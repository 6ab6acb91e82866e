"""The gRPC service: protobuf <-> domain types, validation, and the one table of status codes.

This is the only module of the serving path that handles generated protobuf types (through
`server.stubs`). Below it everything is plain Python and numpy. Every handler is wrapped by `_rpc`,
which turns domain errors into their status code with a google.rpc.BadRequest detail naming the
field, and anything unexpected into INTERNAL (logged, never a silent empty answer).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.classifier import item_text
from server.config import DEFAULT_K, MAX_K, MAX_QUERY_CHARS
from server.errors import (DeadlineExpired, FailedPrecondition, InvalidArgument, NotFound, Overloaded,
                           PermissionDenied, SearchrecError, Unavailable, Unimplemented)  # noqa: F401
from server.access import Undecodable
from server.fields import MAX_FILTER_VALUE_CHARS, MAX_ID_CHARS
from server.fields import id_list as _id_list, text_field as _text_field
from server.live import passage
from common.seqrec import HISTORY_CAP
from server.recommend import RecQuery
from server.listing import FACETS, MAX_LIST_DEPTH, MAX_PAGE_SIZE, SORT_NAMES, Listing, list_fingerprint
from server.retrieval import filter_mask
from server.runtime import RuntimeHolder
from server.service_ads import AdsRpcs, ad_event
from server.service_storefront import StorefrontRpcs
from server.state import ADD_TO_CART, CLICK, EVENT_WEIGHT, PURCHASE, VIEW, Event
from server.stubs import pb, pb_grpc
from server.types import Filters, Hit, SearchQuery

log = logging.getLogger(__name__)

MAX_FILTER_VALUES = 100
MAX_FILTER_ITEM_IDS = 1000
MAX_RECENT_ITEMS = 200
MAX_TITLE_CHARS = 500
MAX_DESCRIPTION_CHARS = 5000
MAX_ATTRIBUTES = 50
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000  # events may be stamped at most this far ahead of the server clock
MAX_CLASSIFY_K = 50
DEFAULT_CLASSIFY_K = 3

# Domain error -> gRPC status: the one table.
_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def _status_for(exc: SearchrecError) -> status_pb2.Status:
    # The nearest class in the table (a StoreUnavailable is an Unavailable).
    code = next((_STATUS[c] for c in type(exc).__mro__ if c in _STATUS), grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    if exc.field:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)]))
        status.details.append(detail)
    return status


def _rpc(handler):
    """Map domain errors to status codes; log and hide anything unexpected behind INTERNAL; record
    each call's latency and status code in the metrics."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        try:
            if isinstance(request, Undecodable):
                raise InvalidArgument(f"the request is not a valid {handler.__name__}Request message: {request.problem}",
                                      field="request")
            result = await handler(self, request, context)
        except SearchrecError as exc:
            status = _status_for(exc)
        except asyncio.CancelledError:
            self._observe(handler.__name__, started, "CANCELLED")
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"{handler.__name__}: internal error (logged on the server)")
        else:
            self._observe(handler.__name__, started, "OK")
            return result
        self._observe(handler.__name__, started, code_pb2.Code.Name(status.code))
        await context.abort_with_status(rpc_status.to_status(status))

    return wrapper


# --- validation: protobuf fields -> domain values -------------------------------------------

def _k(msg, field: str = "k") -> int:
    if not msg.HasField(field):
        return DEFAULT_K
    k = getattr(msg, field)
    if not 1 <= k <= MAX_K:
        raise InvalidArgument(f"{field} must be between 1 and {MAX_K}, got {k}", field=field)
    return k


def _price(f, name: str) -> float | None:
    if not f.HasField(name):
        return None
    value = getattr(f, name)
    if math.isnan(value) or math.isinf(value):
        raise InvalidArgument(f"filters.{name} must be a finite number, got {value}", field=f"filters.{name}")
    if value < 0:
        raise InvalidArgument(f"filters.{name} must be >= 0, got {value}", field=f"filters.{name}")
    return float(value)


def _names(values, field: str, limit: int = MAX_FILTER_VALUES) -> tuple[str, ...]:
    if len(values) > limit:
        raise InvalidArgument(f"{field} has {len(values)} values; the limit is {limit}", field=field)
    return tuple(_text_field(v, field, MAX_FILTER_VALUE_CHARS, required=True) for v in values)


def to_filters(f) -> Filters:
    """Convert pb.Filters -> Filters."""
    lo, hi = _price(f, "min_price"), _price(f, "max_price")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidArgument(f"filters.min_price ({lo}) must not exceed filters.max_price ({hi})",
                              field="filters.min_price")
    below = _price(f, "below_price")
    if lo is not None and below is not None and lo >= below:
        raise InvalidArgument(f"filters.min_price ({lo}) must be below filters.below_price ({below})",
                              field="filters.min_price")
    return Filters(min_price=lo, max_price=hi, categories=_names(f.categories, "filters.categories"),
                   brands=_names(f.brands, "filters.brands"), in_stock_only=f.in_stock_only,
                   item_ids=_names(f.item_ids, "filters.item_ids", MAX_FILTER_ITEM_IDS), below_price=below)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SearchRecommendService(StorefrontRpcs, AdsRpcs, pb_grpc.SearchRecommendServicer):
    """searchrec.v1.SearchRecommend over a RuntimeHolder."""

    def __init__(self, holder: RuntimeHolder, started_at: float, metrics=None,
                 pseudonymise: Callable[[str], str] | None = None, replica=None, gatekeeper=None) -> None:
        self.holder = holder
        self.gatekeeper = gatekeeper  # server.access.Gatekeeper: who calls (advertiser-scoped ad RPCs)
        self.replica = replica  # server.replica.Replica: the store this server records in (None = no writes)
        self.started_at = started_at
        self.metrics = metrics
        # User ids are replaced by keyed pseudonyms before they reach the event store or a log line.
        self.pseudonymise = pseudonymise or (lambda user_id: user_id)

    def _observe(self, method: str, started: float, code: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_rpc(method, time.perf_counter() - started, code)

    async def _consistent(self, request, context) -> None:
        """Honour min_sequence_token: wait until this replica has applied that catalog change."""
        token = request.min_sequence_token
        if not token:
            return
        if len(token) > 64:
            raise InvalidArgument(f"min_sequence_token is {len(token)} characters; the limit is 64",
                                  field="min_sequence_token")
        if self.replica is None:
            raise FailedPrecondition("min_sequence_token names a catalog change, but this server records none "
                                     "(started without --state-dir or --state)", field="min_sequence_token")
        await self.replica.wait_for(token, "min_sequence_token", _deadline(context))

    # Convert Hit --> pb.ScoredItem.
    @staticmethod
    def _scored(bundle, hit: Hit):
        it = bundle.items
        price = float(it.price_exact[hit.row])
        item = pb.ScoredItem(item_id=it.ids[hit.row], score=hit.score, title=it.titles[hit.row],
                             category=it.categories[hit.row], brand=it.brands[hit.row],
                             in_stock=bool(it.in_stock[hit.row]),
                             category_predicted=bool(it.category_predicted[hit.row]))
        if not math.isnan(price):
            item.price = price
        for c in hit.explanation:
            item.explanation.add(name=c.name, value=c.value, contribution=c.contribution)
        return item

    def _listing(self, request, runtime, text: str, filters: Filters) -> Listing | None:
        """The list-mode part of a Search (None for a plain Search), its page token checked."""
        if request.sort not in SORT_NAMES:
            raise InvalidArgument(f"sort must be one of {', '.join(n.upper() for n in SORT_NAMES.values())}, "
                                  f"got {request.sort}", field="sort")
        facets = tuple(dict.fromkeys(request.facets))
        for i, f in enumerate(facets):
            if f not in FACETS:
                raise InvalidArgument(f"facets[{i}] must be one of {', '.join(FACETS)}, got {f!r}", field=f"facets[{i}]")
        has_offset = request.HasField("offset")
        if not (request.sort or facets or request.paged or request.page_token or has_offset):
            return None
        if request.HasField("k") and request.k > MAX_PAGE_SIZE:
            raise InvalidArgument(f"k is the page size in list mode (sort, facets, paged, page_token or offset): "
                                  f"1..{MAX_PAGE_SIZE}, got {request.k}", field="k")
        if has_offset and request.page_token:
            raise InvalidArgument("give page_token or offset, not both", field="offset")
        if has_offset and not 0 <= request.offset < MAX_LIST_DEPTH:
            raise InvalidArgument(f"offset must be between 0 and {MAX_LIST_DEPTH - 1} (the depth limit of a result "
                                  f"list), got {request.offset}", field="offset")
        listing = Listing(sort=request.sort, facets=facets, offset=request.offset if has_offset else 0,
                          paged=request.paged or bool(request.page_token),
                          fingerprint=list_fingerprint(text, filters, request.sort, request.prefix))
        if request.page_token:
            offset, key, vec = self.holder.page_tokens.read(request.page_token, runtime.version, listing.fingerprint,
                                                            runtime.encoder.dims)
            listing = replace(listing, after=key, after_offset=offset, qvec=vec)
        return listing

    @_rpc
    async def Search(self, request, context):
        started = time.perf_counter()
        # Convert pb.SearchRequest --> SearchQuery.
        text = _text_field(request.query, "query", MAX_QUERY_CHARS, required=True)
        filters = to_filters(request.filters)
        await self._consistent(request, context)
        runtime = self.holder.current  # this request finishes on this bundle, whatever swaps meanwhile
        listing = self._listing(request, runtime, text, filters)
        user_id = _text_field(request.user_id, "user_id", MAX_ID_CHARS, required=False)
        k, slots = _k(request), self._ad_slots(request)
        user_key = self.pseudonymise(user_id) if user_id else ""
        cands = None
        if slots:
            cands = await self._ad_candidates(runtime.bundle, self.holder.ads.campaigns.matching(text), user_key)
        query = SearchQuery(
            text=text,
            # Ad items leave the organic answer, so a plain Search with ads asks for enough to fill it anyway.
            k=k + slots if cands is not None and listing is None else k,
            filters=filters,
            explain=request.explain,
            user_id=user_id,
            prefix=request.prefix,
            listing=listing,
            rules=self.holder.rules.match(text) or None,
            ad_rows=cands.rows if cands is not None else None,
        )
        deadline = _deadline(context)
        if request.classify_query:
            self._classifier(runtime, "classify_query")
            # The query's category is computed beside the search, in the classify batcher: no added wait.
            result, cat = await asyncio.gather(runtime.batcher.submit(query, deadline),
                                               runtime.classify_batcher.submit([query.text], deadline))
            predicted = _prediction(runtime.classifier.top(cat.value[0], 1).predictions[0])
        else:
            result, predicted = await runtime.batcher.submit(query, deadline), None
        out = result.value
        hits, sold = out.hits, []
        if cands is not None and out.ads is not None:
            a = out.ads
            shown = [h.row for h in hits]
            ids = runtime.bundle.items.id_to_row
            pins = query.rules.pins if query.rules else ()
            # List mode: the page stays as it is (pages must add up to the list); the ad is not one of its items.
            # A pinned item is the merchant's: never sold as an ad.
            exclude = set(shown) if listing is not None else {ids[i] for _, i, _ in pins if i in ids}
            sold = await self._sell(runtime.bundle, cands, a.rows, a.scores, a.passes, a.organic_rank, slots, shown,
                                    exclude, user_key)
            taken = {s.row for s in sold}
            if listing is None and taken:
                hits = repin([h for h in hits if h.row not in taken], pins, ids)
        if listing is None:
            hits = hits[:k]
        response = pb.SearchResponse(
            predicted_category=predicted,
            items=[self._scored(runtime.bundle, h) for h in hits],
            sponsored=self._sponsored_pb(runtime.bundle, sold),
            bundle_version=runtime.version,
            timings=pb.Timings(queue_ms=1000 * result.queue_s, encode_ms=1000 * out.encode_s,
                               retrieve_ms=1000 * out.retrieve_s, rank_ms=1000 * out.rank_s,
                               total_ms=1000 * (time.perf_counter() - started), batch_size=result.batch_size),
            corrected_query=out.corrected_query,
        )
        if request.explain:
            for f in out.fired:
                response.rules_fired.add(rule_id=f.rule_id, kind=f.kind, detail=f.detail)
        if out.page is not None:
            page = out.page
            response.offset, response.total_results = page.offset, page.total
            if listing.paged and page.next_key is not None:
                response.next_page_token = self.holder.page_tokens.issue(
                    runtime.version, listing.fingerprint, page.offset + len(page.rows), page.next_key, out.qvec)
            for name in listing.facets:
                values, more = page.facets[name]
                facet = response.facets.add(field=name, more_values=more)
                for v in values:
                    fv = facet.values.add(value=v.value, count=v.count, level=v.level)
                    if v.min_price is not None:
                        fv.min_price = v.min_price
                    if v.below_price is not None:
                        fv.below_price = v.below_price
        return response

    @_rpc
    async def SimilarItems(self, request, context):
        item_id = _text_field(request.item_id, "item_id", MAX_ID_CHARS, required=True)
        k, filters = _k(request), to_filters(request.filters)
        _text_field(request.user_id, "user_id", MAX_ID_CHARS, required=False)
        slots = self._ad_slots(request)
        await self._consistent(request, context)
        runtime = self.holder.current
        source = runtime.engine.row_of(item_id)  # NOT_FOUND before any work is queued
        deadline = _deadline(context)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpired("the deadline passed before the request could run")
        def similar():
            # Checked again when a compute thread gets to it: it may have waited behind batches.
            if deadline is not None and deadline <= time.monotonic():
                raise DeadlineExpired("the deadline passed while the request waited for a compute thread")
            return runtime.similar(item_id, k + slots, filters, request.explain)

        hits = await asyncio.get_running_loop().run_in_executor(self.holder.compute, similar)
        sold = []
        if slots:
            bundle = runtime.bundle
            anchor = bundle.vectors[source].astype(np.float32)
            user_id = _text_field(request.user_id, "user_id", MAX_ID_CHARS, required=False)
            hits, sold = await self._sponsored_by_vector(runtime, anchor, hits, k, slots,
                                                         self.holder.ads.campaigns.untargeted(),
                                                         self.pseudonymise(user_id) if user_id else "", {source},
                                                         mask=self._ad_mask(bundle, filters))
        return pb.SimilarItemsResponse(items=[self._scored(runtime.bundle, h) for h in hits[:k]],
                                       bundle_version=runtime.version,
                                       sponsored=self._sponsored_pb(runtime.bundle, sold))

    @_rpc
    async def GetInfo(self, request, context):
        runtime = self.holder.current
        b, s, cfg, live = runtime.bundle, self.holder.stats, self.holder.config, self.holder.live
        store = self.holder.store
        state = store.info() if store is not None else {"backend": "none", "url": "", "up": False, "log_bytes": 0}
        fleet = await self.replica.fleet() if self.replica is not None else []
        return pb.GetInfoResponse(
            bundle_version=b.version, bundle_path=str(b.path), device=self.holder.device, dtype=self.holder.dtype,
            backend=runtime.encoder.backend,
            index_type=b.index_type, index_size=int(b.index.ntotal), item_count=len(b.items),
            dims=int(b.encoder["dims"]), encoder=str(b.encoder.get("name", "")), features=list(b.reranker.features),
            schema_version=str(b.manifest["schema_version"]), uptime_s=time.monotonic() - self.started_at,
            faiss_on_gpu=runtime.engine.dense.on_gpu,
            recommender=b.rec is not None, rec_users=len(b.rec.user_index) if b.rec is not None else 0,
            live_users=len(live.users) if live else 0, event_log_bytes=state["log_bytes"],
            live_items=len(live.items) if live else 0,
            state_backend=state["backend"], state_url=state["url"], state_up=state["up"],
            replica_id=getattr(store, "origin", "local" if store is not None else ""),
            applied_token=self.replica.applied if self.replica is not None else "",
            replicas=[pb.ReplicaInfo(replica_id=r["id"], address=r.get("address", ""), bundle_version=r.get("version", ""),
                                     applied_token=r.get("applied", ""), heartbeat_age_s=r.get("age_s", 0.0),
                                     state_up=r.get("store_up", False)) for r in fleet],
            stale_reads=store.stale_reads if store is not None else 0,
            classifier=runtime.classifier is not None,
            classifier_categories=runtime.classifier.categories if runtime.classifier is not None else 0,
            autofill_threshold=runtime.classifier.threshold if runtime.classifier is not None else 0.0,
            autofill_categories=self._autofills(runtime),
            suggest_phrases=len(runtime.suggester.texts) if runtime.suggester is not None else 0,
            suggest_live_phrases=len(runtime.suggester.extra) if runtime.suggester is not None else 0,
            rules=len(live.rules) if live is not None else 0,
            campaigns=len(live.campaigns) if live is not None else 0,
            native_bf16=self.holder.cpu["native_bf16"], cpu_flags=self.holder.cpu["cpu_flags"],
            batcher=pb.BatcherInfo(
                max_batch_size=cfg.max_batch_size, max_delay_ms=cfg.max_delay_ms, max_queue=cfg.max_queue,
                batches_run=s.batches_run, mean_batch_size=s.mean_batch_size, mean_queue_ms=s.mean_queue_ms,
                mean_compute_ms=s.mean_compute_ms, requests_done=s.done, requests_rejected=s.rejected,
                requests_expired=s.expired, requests_cancelled=s.cancelled, requests_failed=s.failed,
                queue_depth=runtime.batcher.queue_depth),
        )

    @_rpc
    async def ReloadBundle(self, request, context):
        path = _text_field(request.path, "path", 4096, required=False)
        target = Path(path) if path else None
        # With a shared store every replica verifies and warms the bundle before any of them swaps.
        new, old, seconds = await (self.replica.reload(target) if self.replica is not None
                                   else self.holder.reload(target))
        return pb.ReloadBundleResponse(bundle_version=new.version, previous_version=old.version, load_s=seconds)

    # --- Classify ----------------------------------------------------------------------------
    @staticmethod
    def _classifier(runtime, field: str):
        if runtime.classifier is None:
            raise FailedPrecondition(
                f"bundle {runtime.version} has no classifier (its manifest has no 'classifier' part); build one "
                "with `python -m training build ... --classifier` (or --classifier-from a build-classifier bundle)",
                field=field)
        return runtime.classifier

    def _autofills(self, runtime) -> bool:
        return (self.holder.config.autofill_categories and runtime.classifier is not None
                and runtime.classifier.autofills)

    @_rpc
    async def Classify(self, request, context):
        runtime = self.holder.current
        clf = self._classifier(runtime, "bundle")
        limit = self.holder.config.max_write_batch
        n = len(request.items) + len(request.queries)
        if n == 0:
            raise InvalidArgument("give at least one entry in items or queries", field="items")
        if n > limit:
            raise InvalidArgument(f"items and queries have {n} entries together; the limit is {limit} per request",
                                  field="items" if len(request.items) > len(request.queries) else "queries")
        k = DEFAULT_CLASSIFY_K
        if request.HasField("k"):
            k = request.k
            if not 1 <= k <= MAX_CLASSIFY_K:
                raise InvalidArgument(f"k must be between 1 and {MAX_CLASSIFY_K}, got {k}", field="k")
        texts = []
        for i, it in enumerate(request.items):
            f = f"items[{i}]"
            title = _text_field(it.title, f"{f}.title", MAX_TITLE_CHARS, required=True)
            _text_field(it.description, f"{f}.description", MAX_DESCRIPTION_CHARS, required=False)
            brand = _text_field(it.brand, f"{f}.brand", MAX_FILTER_VALUE_CHARS, required=False)
            _attributes(it.attributes, f)
            texts.append(item_text(title, brand))
        for i, q in enumerate(request.queries):
            texts.append(_text_field(q, f"queries[{i}]", MAX_QUERY_CHARS, required=True))
        result = await runtime.classify_batcher.submit(texts, _deadline(context))
        out = [_classification(clf.top(row, k)) for row in result.value]
        m = len(request.items)
        return pb.ClassifyResponse(items=out[:m], queries=out[m:], bundle_version=runtime.version,
                                   autofill_threshold=clf.threshold)

    async def _autofill(self, runtime, items: list[dict], deadline: float | None) -> list:
        """Fill in the category of items that have none where the classifier is sure enough (in place)."""
        missing = [it for it in items if not it["category"]]
        if not missing or not self._autofills(runtime):
            return []
        clf = runtime.classifier
        result = await runtime.classify_batcher.submit([item_text(it["title"], it["brand"]) for it in missing],
                                                       deadline)
        fills = []
        for it, row in zip(missing, result.value):
            top = clf.top(row, 1).predictions[0]
            filled = clf.fills(top.probability)
            if filled:  # stored with the item: every replica, the log and a restart see the same category
                it.update(category=top.path, category_predicted=True, category_probability=round(top.probability, 6))
            fills.append(pb.CategoryFill(item_id=it["item_id"], category=top.path, probability=top.probability,
                                         filled=filled))
        if self.metrics is not None:
            done = sum(f.filled for f in fills)
            self.metrics.observe_autofill(done, len(fills) - done)
        return fills

    # --- storefront: Suggest and merchandising rules (handlers in server.service_storefront) --------
    Suggest = _rpc(StorefrontRpcs.Suggest)
    PutRules = _rpc(StorefrontRpcs.PutRules)
    DeleteRules = _rpc(StorefrontRpcs.DeleteRules)
    ListRules = _rpc(StorefrontRpcs.ListRules)

    # --- sponsored products (handlers in server.service_ads) -------------------------------------
    PutCampaigns = _rpc(AdsRpcs.PutCampaigns)
    SetCampaignStatus = _rpc(AdsRpcs.SetCampaignStatus)
    ListCampaigns = _rpc(AdsRpcs.ListCampaigns)
    AdsReport = _rpc(AdsRpcs.AdsReport)

    @staticmethod
    def _ad_mask(bundle, filters: Filters) -> np.ndarray | None:
        mask = filter_mask(bundle.items, filters)
        if bundle.alive is not None:
            mask = bundle.alive if mask is None else mask & bundle.alive
        return mask

    # --- Recommend ---------------------------------------------------------------------------
    def _rec_query(self, runtime, user_id: str, recent: tuple[str, ...], k: int, filters: Filters,
                   live_events: list[tuple[str, int]]) -> RecQuery:
        """The user's history as item rows: bundle history + live events + recent items (oldest first)."""
        items, rec = runtime.bundle.items, runtime.bundle.rec
        recent_rows = []
        for i, item_id in enumerate(recent):
            row = items.id_to_row.get(item_id)
            if row is None:
                raise NotFound(f"recent_item_ids[{i}] {item_id!r} is not in the catalog", field=f"recent_item_ids[{i}]")
            recent_rows.append(row)
        repeats = runtime.rec.allow_repeats
        hist: list[int] = []
        exclude: set[int] = set()
        pseudonym = self.pseudonymise(user_id)
        # A bundle built from our own event store knows users by pseudonym; one built from raw logs by id.
        u = (rec.user_index.get(user_id, rec.user_index.get(pseudonym)) if user_id else None)
        if u is not None:
            for r in rec.history(u)[-HISTORY_CAP:]:
                row = items.id_to_row.get(items.ids[r])  # a changed item lives on in its new row
                if row is not None:
                    hist.append(row)
                    if not repeats:
                        exclude.add(row)  # bundle histories are purchases
        if user_id:
            for item_id, kind in live_events:
                row = items.id_to_row.get(item_id)
                if row is None:
                    continue
                hist.append(row)
                if kind in (ADD_TO_CART, PURCHASE) and not repeats:
                    exclude.add(row)
        hist.extend(recent_rows)
        if not repeats:
            exclude.update(recent_rows)  # what the user is looking at now is no recommendation
        mask = filter_mask(items, filters)
        if runtime.bundle.alive is not None:
            mask = runtime.bundle.alive.copy() if mask is None else mask & runtime.bundle.alive
        return RecQuery(tuple(hist[-HISTORY_CAP:]), tuple(sorted(exclude)), k, filters, mask)

    @_rpc
    async def Recommend(self, request, context):
        user_id = _text_field(request.user_id, "user_id", MAX_ID_CHARS, required=False)
        recent = _id_list(request.recent_item_ids, "recent_item_ids", MAX_RECENT_ITEMS)
        k, filters = _k(request), to_filters(request.filters)
        runtime = self.holder.current
        if runtime.rec is None:
            raise FailedPrecondition(f"bundle {runtime.version} has no recommender (it was built without behaviour "
                                     "data); build one with --interactions or --dataset", field="user_id")
        await self._consistent(request, context)
        runtime = self.holder.current  # again: the wait may have seen a swap
        store = self.holder.store
        # The user's live events come from the store: a Feedback acknowledged by any replica counts here.
        live_events = (await store.user_events(self.pseudonymise(user_id))) if user_id and store is not None else []
        slots = self._ad_slots(request)
        query = self._rec_query(runtime, user_id, recent, k + slots, filters, live_events)
        result = await runtime.rec_batcher.submit(query, _deadline(context))
        hits, sold = result.value, []
        if slots:
            from server.ads.serving import user_interest

            bundle = runtime.bundle
            history = list(query.history)
            hits, sold = await self._sponsored_by_vector(
                runtime, user_interest(bundle, history[-20:]), hits, k, slots, self.holder.ads.campaigns.untargeted(),
                self.pseudonymise(user_id) if user_id else "", set(query.exclude), history,
                mask=self._ad_mask(bundle, filters))
        return pb.RecommendResponse(items=[self._scored(runtime.bundle, h) for h in hits[:k]],
                                    bundle_version=runtime.version, history_events=len(query.history),
                                    sponsored=self._sponsored_pb(runtime.bundle, sold))

    # --- writes ------------------------------------------------------------------------------
    def _live(self):
        if self.holder.store is None:
            raise FailedPrecondition("this server was started without --state-dir or --state, so it cannot make "
                                     "writes durable; restart it with --state-dir DIR (or --state redis://...)",
                                     field="state_dir")
        return self.holder.live

    def _batch_size(self, n: int, field: str) -> None:
        limit = self.holder.config.max_write_batch
        if n == 0:
            raise InvalidArgument(f"{field} must not be empty", field=field)
        if n > limit:
            raise InvalidArgument(f"{field} has {n} entries; the limit is {limit} per request", field=field)

    @_rpc
    async def Feedback(self, request, context):
        self._live()
        self._batch_size(len(request.events), "events")
        runtime = self.holder.current
        now_ms = int(time.time() * 1000)
        events = []
        for i, e in enumerate(request.events):
            f = f"events[{i}]"
            event_id = _text_field(e.event_id, f"{f}.event_id", MAX_ID_CHARS, required=True)
            user_id = _text_field(e.user_id, f"{f}.user_id", MAX_ID_CHARS, required=True)
            item_id = _text_field(e.item_id, f"{f}.item_id", MAX_ID_CHARS, required=True)
            if e.type not in (VIEW, CLICK, ADD_TO_CART, PURCHASE):
                raise InvalidArgument(f"{f}.type must be VIEW, CLICK, ADD_TO_CART or PURCHASE, got {e.type}",
                                      field=f"{f}.type")
            ts = e.timestamp_ms or now_ms
            if ts < 0:
                raise InvalidArgument(f"{f}.timestamp_ms must be >= 0, got {ts}", field=f"{f}.timestamp_ms")
            if ts > now_ms + MAX_CLOCK_SKEW_MS:
                raise InvalidArgument(f"{f}.timestamp_ms {ts} is more than {MAX_CLOCK_SKEW_MS // 1000} s in the future",
                                      field=f"{f}.timestamp_ms")
            query = _text_field(e.query, f"{f}.query", MAX_QUERY_CHARS, required=False)
            if e.position < 0:
                raise InvalidArgument(f"{f}.position must be >= 0, got {e.position}", field=f"{f}.position")
            if item_id not in runtime.bundle.items.id_to_row:
                raise NotFound(f"{f}.item_id {item_id!r} is not in the catalog; nothing of this request was applied",
                               field=f"{f}.item_id")
            ad = ad_event(self.holder.ads, e.auction_id, item_id, f) if e.auction_id else None
            events.append(Event(event_id, self.pseudonymise(user_id), item_id, int(e.type), int(ts), query,
                                int(e.position), e.auction_id, ad))
        # Durable in the store (idempotent by event_id, within the request and across requests and replicas)
        # before it is acknowledged; UNAVAILABLE, with nothing recorded, when the store cannot take it.
        fresh = await self.holder.store.record_events(events)
        rec = self.holder.current.rec
        if rec is not None:
            ids = self.holder.current.bundle.items.id_to_row
            for ev in fresh:
                row = ids.get(ev.item_id)
                if row is not None and row < len(rec.live_popularity):
                    rec.live_popularity[row] += EVENT_WEIGHT[ev.type]
        charged = 0
        if self.holder.ads is not None:
            done = self.holder.live.ads.charged
            paid = [ev for ev in fresh if ev.ad is not None and ev.type == CLICK and done.get(ev.auction_id) == ev.event_id]
            charged = len(paid)
            if self.metrics is not None:
                clicks = sum(1 for ev in fresh if ev.ad is not None and ev.type == CLICK)
                self.metrics.observe_ad_clicks(charged, clicks - charged, sum(ev.ad[1] for ev in paid))
        return pb.FeedbackResponse(accepted=len(fresh), duplicates=len(events) - len(fresh), charged=charged)

    @_rpc
    async def UpsertItems(self, request, context):
        self._live()
        self._batch_size(len(request.items), "items")
        items, seen = [], set()
        for i, it in enumerate(request.items):
            items.append(_item(it, f"items[{i}]"))
            if items[-1]["item_id"] in seen:
                raise InvalidArgument(f"items[{i}].item_id {items[-1]['item_id']!r} appears twice in this request",
                                      field=f"items[{i}].item_id")
            seen.add(items[-1]["item_id"])
        deadline = _deadline(context)
        table, now_ms = self.holder.current.bundle.items, time.time() * 1000
        for it in items:  # when it entered the catalog (the "newest" sort): a change keeps the first time
            row = table.id_to_row.get(it["item_id"])
            it["added_ms"] = float(table.added_ms[row]) if row is not None and table.added_ms[row] > 0 else now_ms
        # Before the encoding: the passage an item is encoded from includes its category.
        fills = await self._autofill(self.holder.current, items, deadline)
        async with self.holder.catalog_lock:
            runtime = self.holder.current
            vectors = await runtime.encode_batcher.submit([passage(it) for it in items], deadline)
            matrix = np.asarray(vectors.value, np.float32)
            token = await self.replica.write_catalog("upsert", items, matrix)  # durable before it is visible
        return pb.UpsertItemsResponse(upserted=len(items), sequence_token=token, category_fills=fills)

    @_rpc
    async def DeleteItems(self, request, context):
        self._live()
        self._batch_size(len(request.item_ids), "item_ids")
        ids = _id_list(request.item_ids, "item_ids", self.holder.config.max_write_batch)
        async with self.holder.catalog_lock:
            runtime = self.holder.current
            for i, item_id in enumerate(ids):
                if item_id not in runtime.bundle.items.id_to_row:
                    raise NotFound(f"item_ids[{i}] {item_id!r} is not in the catalog; nothing was deleted",
                                   field=f"item_ids[{i}]")
            unique = list(dict.fromkeys(ids))
            token = await self.replica.write_catalog("delete", unique, None)
        return pb.DeleteItemsResponse(deleted=len(unique), sequence_token=token)


def _item(it, f: str) -> dict:
    """pb.Item -> the dict the live catalog and the event log store."""
    item = {
        "item_id": _text_field(it.item_id, f"{f}.item_id", MAX_ID_CHARS, required=True),
        "title": _text_field(it.title, f"{f}.title", MAX_TITLE_CHARS, required=True),
        "description": _text_field(it.description, f"{f}.description", MAX_DESCRIPTION_CHARS, required=False),
        "category": _text_field(it.category, f"{f}.category", MAX_FILTER_VALUE_CHARS, required=False),
        "brand": _text_field(it.brand, f"{f}.brand", MAX_FILTER_VALUE_CHARS, required=False),
        "price": None,
        "in_stock": bool(it.in_stock),
    }
    if it.HasField("price"):
        if math.isnan(it.price) or math.isinf(it.price) or it.price < 0:
            raise InvalidArgument(f"{f}.price must be a finite number >= 0, got {it.price}", field=f"{f}.price")
        item["price"] = float(it.price)
    item["attributes"] = _attributes(it.attributes, f)
    return item


def _attributes(attributes, f: str) -> dict[str, str]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument(f"{f}.attributes has {len(attributes)} entries; the limit is {MAX_ATTRIBUTES}",
                              field=f"{f}.attributes")
    return {_text_field(k, f"{f}.attributes key", MAX_FILTER_VALUE_CHARS, required=True):
            _text_field(v, f"{f}.attributes[{k}]", MAX_FILTER_VALUE_CHARS, required=False)
            for k, v in attributes.items()}


def repin(hits: list[Hit], pins, ids: dict[str, int]) -> list[Hit]:
    """Pinned items back at their positions after ad items left the list above them."""
    for _rule_id, item_id, position in sorted(pins, key=lambda p: (p[2], p[0])):
        at = next((j for j, h in enumerate(hits) if h.row == ids.get(item_id)), None)
        if at is not None and at != position - 1:
            hit = hits.pop(at)
            hits.insert(min(position - 1, len(hits)), hit)
    return hits


def _prediction(p) -> "pb.CategoryPrediction":
    """server.classify.Prediction -> pb.CategoryPrediction."""
    return pb.CategoryPrediction(path=p.path, probability=p.probability,
                                 levels=[pb.CategoryLevel(name=n, probability=q) for n, q in p.levels])


def _classification(c) -> "pb.Classification":
    return pb.Classification(categories=[_prediction(p) for p in c.predictions], confident=c.confident)


def add_to_server(service: SearchRecommendService, server: grpc.aio.Server) -> None:
    pb_grpc.add_SearchRecommendServicer_to_server(service, server)
