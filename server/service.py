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
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.text import has_control_chars
from server.config import DEFAULT_K, MAX_K, MAX_QUERY_CHARS
from server.errors import (DeadlineExpired, FailedPrecondition, InvalidArgument, NotFound, Overloaded,
                           SearchrecError, Unavailable, Unimplemented)
from server.runtime import RuntimeHolder
from server.stubs import pb, pb_grpc
from server.types import Filters, Hit, SearchQuery

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256
MAX_FILTER_VALUES = 100
MAX_FILTER_VALUE_CHARS = 200
MAX_FILTER_ITEM_IDS = 1000

# Domain error -> gRPC status: the one table.
_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def _status_for(exc: SearchrecError) -> status_pb2.Status:
    code = _STATUS.get(type(exc), grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    if exc.field:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)]))
        status.details.append(detail)
    return status


def _rpc(handler):
    """Map domain errors to status codes; log and hide anything unexpected behind INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except SearchrecError as exc:
            status = _status_for(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"{handler.__name__}: internal error (logged on the server)")
        await context.abort_with_status(rpc_status.to_status(status))

    return wrapper


# --- validation: protobuf fields -> domain values -------------------------------------------

def _text_field(value: str, field: str, limit: int, *, required: bool) -> str:
    text = value.strip()
    if required and not text:
        raise InvalidArgument(f"{field} must not be empty or whitespace", field=field)
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}", field=field)
    if has_control_chars(value):
        raise InvalidArgument(f"{field} must not contain control characters", field=field)
    return text


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
    return Filters(min_price=lo, max_price=hi, categories=_names(f.categories, "filters.categories"),
                   brands=_names(f.brands, "filters.brands"), in_stock_only=f.in_stock_only,
                   item_ids=_names(f.item_ids, "filters.item_ids", MAX_FILTER_ITEM_IDS))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SearchRecommendService(pb_grpc.SearchRecommendServicer):
    """searchrec.v1.SearchRecommend over a RuntimeHolder."""

    def __init__(self, holder: RuntimeHolder, started_at: float) -> None:
        self.holder = holder
        self.started_at = started_at

    # Convert Hit --> pb.ScoredItem.
    @staticmethod
    def _scored(bundle, hit: Hit):
        it = bundle.items
        price = float(it.price[hit.row])
        item = pb.ScoredItem(item_id=it.ids[hit.row], score=hit.score, title=it.titles[hit.row],
                             category=it.categories[hit.row], brand=it.brands[hit.row],
                             in_stock=bool(it.in_stock[hit.row]))
        if not math.isnan(price):
            item.price = price
        for c in hit.explanation:
            item.explanation.add(name=c.name, value=c.value, contribution=c.contribution)
        return item

    @_rpc
    async def Search(self, request, context):
        started = time.perf_counter()
        # Convert pb.SearchRequest --> SearchQuery.
        query = SearchQuery(
            text=_text_field(request.query, "query", MAX_QUERY_CHARS, required=True),
            k=_k(request),
            filters=to_filters(request.filters),
            explain=request.explain,
            user_id=_text_field(request.user_id, "user_id", MAX_ID_CHARS, required=False),
        )
        runtime = self.holder.current  # this request finishes on this bundle, whatever swaps meanwhile
        result = await runtime.batcher.submit(query, _deadline(context))
        out = result.value
        return pb.SearchResponse(
            items=[self._scored(runtime.bundle, h) for h in out.hits],
            bundle_version=runtime.version,
            timings=pb.Timings(queue_ms=1000 * result.queue_s, encode_ms=1000 * out.encode_s,
                               retrieve_ms=1000 * out.retrieve_s, rank_ms=1000 * out.rank_s,
                               total_ms=1000 * (time.perf_counter() - started), batch_size=result.batch_size),
        )

    @_rpc
    async def SimilarItems(self, request, context):
        item_id = _text_field(request.item_id, "item_id", MAX_ID_CHARS, required=True)
        k, filters = _k(request), to_filters(request.filters)
        runtime = self.holder.current
        runtime.engine.row_of(item_id)  # NOT_FOUND before any work is queued
        deadline = _deadline(context)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpired("the deadline passed before the request could run")
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(self.holder.compute, runtime.engine.similar, item_id, k, filters,
                                          request.explain)
        return pb.SimilarItemsResponse(items=[self._scored(runtime.bundle, h) for h in hits],
                                       bundle_version=runtime.version)

    @_rpc
    async def GetInfo(self, request, context):
        runtime = self.holder.current
        b, s, cfg = runtime.bundle, self.holder.stats, self.holder.config
        return pb.GetInfoResponse(
            bundle_version=b.version, bundle_path=str(b.path), device=self.holder.device, dtype=self.holder.dtype,
            index_type=b.index_type, index_size=int(b.index.ntotal), item_count=len(b.items),
            dims=int(b.encoder["dims"]), encoder=str(b.encoder.get("name", "")), features=list(b.reranker.features),
            schema_version=str(b.manifest["schema_version"]), uptime_s=time.monotonic() - self.started_at,
            faiss_on_gpu=runtime.engine.dense.on_gpu,
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
        new, old, seconds = await self.holder.reload(Path(path) if path else None)
        return pb.ReloadBundleResponse(bundle_version=new.version, previous_version=old.version, load_s=seconds)

    @_rpc
    async def Recommend(self, request, context):
        raise Unimplemented("Recommend is not implemented yet: it arrives with the recommend work (issue #4)")

    @_rpc
    async def Feedback(self, request, context):
        raise Unimplemented("Feedback is not implemented yet: it arrives with the recommend work (issue #4)")

    @_rpc
    async def UpsertItems(self, request, context):
        raise Unimplemented("UpsertItems is not implemented yet: it arrives with the recommend work (issue #4)")

    @_rpc
    async def DeleteItems(self, request, context):
        raise Unimplemented("DeleteItems is not implemented yet: it arrives with the recommend work (issue #4)")


def add_to_server(service: SearchRecommendService, server: grpc.aio.Server) -> None:
    pb_grpc.add_SearchRecommendServicer_to_server(service, server)
