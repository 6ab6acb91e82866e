"""Hostile requests for every RPC: control characters, very long strings, huge repeated fields, extreme
numbers, NaN and infinities, empty values, duplicates, unknown enum values.

One set of request builders serves two drivers: the property-based tests (`tests/test_hostile.py`,
hypothesis draws the values and shrinks failures) and the reliability report (`bench/reliability.py`,
a seeded random generator draws them). A builder takes a `Draw` and returns (rpc name, request).
`check(...)` says whether the server's answer to one is acceptable: a clear status, never INTERNAL,
UNKNOWN or a hang, and a named field on every INVALID_ARGUMENT / NOT_FOUND.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Protocol

import grpc

# Values a careless or malicious client sends. Long strings go well past every field limit.
STRINGS = ["", " ", "\t\n", "\x00", "a\x00b", "\x1b[31mred", "\u202eevil", "\u200b", "drill", "SR-00001",
           "SR-00001 ", "😀" * 50, "é" * 3000, "x" * 1001, "y" * 20_000, "../../etc/passwd", "' OR 1=1 --",
           "%s%s%n", "\ufeffbom", "\r\n\r\n", "null", "NaN"]
PLAIN = ["drill", "garden hose", "SR-00001", "SR-00100", "U0001", "Power Tools"]
FLOATS = [math.nan, math.inf, -math.inf, -0.0, -1.0, 0.0, 1e-320, 1e308, -1e308, 99.0, 5e9]
INT32 = [-(2 ** 31), -1, 0, 1, 10, 1000, 1001, 2 ** 31 - 1]
INT64 = [-(2 ** 63), -1, 0, 1_700_000_000_000, 4_102_444_800_000, 2 ** 63 - 1]
ENUMS = [0, 1, 2, 3, 4, 5, 99, -7]
SIZES = [0, 1, 2, 3, 201, 1001, 3000]  # list lengths: empty, small, over the limits

KINDS = ("control characters", "long strings", "huge repeated fields", "extreme numbers", "NaN/infinity",
         "empty values", "duplicates", "unknown enum values")


class Draw(Protocol):
    """Where a builder's values come from (hypothesis or a seeded random generator)."""

    def text(self) -> str: ...
    def number(self) -> float: ...
    def int32(self) -> int: ...
    def int64(self) -> int: ...
    def enum(self) -> int: ...
    def flag(self) -> bool: ...
    def size(self) -> int: ...


class RandomDraw:
    """Draw from the pools with a seeded generator, mixing in random unicode text."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def text(self) -> str:
        if self.rng.random() < 0.3:  # plain values too, so that whole requests are sometimes valid
            return self.rng.choice(PLAIN)
        if self.rng.random() < 0.2:
            return "".join(chr(self.rng.choice([self.rng.randrange(0, 0x20), self.rng.randrange(0x20, 0xD7FF)]))
                           for _ in range(self.rng.randrange(0, 40)))
        return self.rng.choice(STRINGS)

    def number(self) -> float:
        return self.rng.choice(FLOATS)

    def int32(self) -> int:
        return self.rng.choice(INT32)

    def int64(self) -> int:
        return self.rng.choice(INT64)

    def enum(self) -> int:
        return self.rng.choice(ENUMS)

    def flag(self) -> bool:
        return self.rng.random() < 0.5

    def size(self) -> int:
        return self.rng.choice(SIZES)


class Short:
    """A Draw whose texts and lists are short: for the one message a builder repeats thousands of times (a request
    of huge messages repeated would be built in the client's memory first, gigabytes of it)."""

    def __init__(self, d: Draw) -> None:
        self.d = d

    def text(self) -> str:
        return self.d.text()[:50]

    def size(self) -> int:
        return min(self.d.size(), 3)

    def __getattr__(self, name: str):
        return getattr(self.d, name)


def _texts(d: Draw) -> list[str]:
    n = d.size()
    first = d.text()
    # Huge lists repeat one value (duplicates) so a request stays within the message limit mostly.
    return [first] * n if n > 3 else [d.text() for _ in range(n)]


def _filters(pb, d: Draw):
    f = pb.Filters(categories=_texts(d), brands=_texts(d), item_ids=_texts(d), in_stock_only=d.flag())
    if d.flag():
        f.min_price = d.number()
    if d.flag():
        f.max_price = d.number()
    return f


def _k(req, d: Draw, field: str = "k") -> None:
    if d.flag():
        setattr(req, field, d.int32())


def search(pb, d: Draw):
    req = pb.SearchRequest(query=d.text(), user_id=d.text(), filters=_filters(pb, d), explain=d.flag(),
                           prefix=d.flag())
    _k(req, d)
    if d.flag():  # list mode: sorts, facets, page tokens and offsets of every kind
        req.sort, req.paged, req.page_token = d.enum(), d.flag(), d.text()
        req.facets.extend(_texts(d)[:5] if d.flag() else ["category", "brand", "price", "price"])
        if d.flag():
            req.offset = d.int32()
        if d.flag():
            req.filters.below_price = d.number()
    if d.flag():
        req.ad_slots = d.int32()
    return "Search", req


def suggest(pb, d: Draw):
    req = pb.SuggestRequest(prefix=d.text(), user_id=d.text(), include_zero_results=d.flag(),
                            include_blocked=d.flag())
    _k(req, d)
    return "Suggest", req


def _rule(pb, d: Draw):
    r = pb.Rule(rule_id=d.text(), query=d.text(), match=d.enum())
    kind = d.int32() % 5
    if kind == 1:
        r.synonyms.terms.extend(_texts(d))
        r.synonyms.one_way = d.flag()
    elif kind == 2:
        r.pin.item_id, r.pin.position = d.text(), d.int32()
    elif kind == 3:
        r.boost.field, r.boost.value, r.boost.weight = d.text(), d.text(), d.number()
    elif kind == 4:
        r.hide.item_id = d.text()
    return r  # kind 0: no action at all


def put_rules(pb, d: Draw):
    n = d.size()
    one = _rule(pb, Short(d) if n > 3 else d)
    return "PutRules", pb.PutRulesRequest(rules=[one] * n if n > 3 else [_rule(pb, d) for _ in range(n)])


def delete_rules(pb, d: Draw):
    return "DeleteRules", pb.DeleteRulesRequest(rule_ids=_texts(d))


def recommend(pb, d: Draw):
    req = pb.RecommendRequest(user_id=d.text(), recent_item_ids=_texts(d), filters=_filters(pb, d))
    _k(req, d)
    _k(req, d, "ad_slots")
    return "Recommend", req


def similar(pb, d: Draw):
    req = pb.SimilarItemsRequest(item_id=d.text(), filters=_filters(pb, d), explain=d.flag(), user_id=d.text())
    _k(req, d)
    _k(req, d, "ad_slots")
    return "SimilarItems", req


def _event(pb, d: Draw):
    return pb.Event(event_id=d.text(), user_id=d.text(), item_id=d.text(), type=d.enum(), timestamp_ms=d.int64(),
                    query=d.text(), position=d.int32(), auction_id=d.text() if d.flag() else "")


def feedback(pb, d: Draw):
    n = d.size()
    one = _event(pb, Short(d) if n > 3 else d)
    events = [one] * n if n > 3 else [_event(pb, d) for _ in range(n)]
    return "Feedback", pb.FeedbackRequest(events=events)


def _item(pb, d: Draw):
    it = pb.Item(item_id=d.text(), title=d.text(), description=d.text(), category=d.text(), brand=d.text(),
                 in_stock=d.flag())
    if d.flag():
        it.price = d.number()
    for _ in range(min(d.size(), 60)):
        it.attributes[d.text()] = d.text()
    return it


def upsert(pb, d: Draw):
    n = min(d.size(), 3) if d.flag() else d.size()
    one = _item(pb, Short(d) if n > 3 else d)
    items = [one] * n if n > 3 else [_item(pb, d) for _ in range(n)]
    return "UpsertItems", pb.UpsertItemsRequest(items=items)


def delete(pb, d: Draw):
    return "DeleteItems", pb.DeleteItemsRequest(item_ids=_texts(d))


def reload(pb, d: Draw):
    return "ReloadBundle", pb.ReloadBundleRequest(path=d.text() or "/")  # empty would re-read the good bundle


def classify(pb, d: Draw):
    n = d.size()
    one = pb.ClassifyItem(title=d.text(), description=d.text(), brand=d.text())
    for _ in range(min(d.size(), 60)):
        one.attributes[d.text()] = d.text()
    items = [one] * n if n > 3 else [pb.ClassifyItem(title=d.text(), brand=d.text()) for _ in range(n)]
    req = pb.ClassifyRequest(items=items, queries=_texts(d))
    _k(req, d)
    return "Classify", req


def _campaign(pb, d: Draw):
    c = pb.Campaign(campaign_id=d.text(), advertiser=d.text(), item_ids=_texts(d), max_cpc=d.number(),
                    daily_budget=d.number(), total_budget=d.number(), start_ms=d.int64(), end_ms=d.int64(),
                    status=d.enum(), negative_keywords=_texts(d), categories=_texts(d),
                    audience_min_interest=d.number(), frequency_cap=d.int32())
    for t in _texts(d):
        c.keywords.add(text=t, match=d.enum())
    return c


def put_campaigns(pb, d: Draw):
    n = d.size()
    if n > 3:
        return "PutCampaigns", pb.PutCampaignsRequest(campaigns=[_campaign(pb, Short(d))] * n)
    return "PutCampaigns", pb.PutCampaignsRequest(campaigns=[_campaign(pb, d) for _ in range(n)])


def campaign_status(pb, d: Draw):
    return "SetCampaignStatus", pb.SetCampaignStatusRequest(campaign_id=d.text(), status=d.enum())


def list_campaigns(pb, d: Draw):
    return "ListCampaigns", pb.ListCampaignsRequest(advertiser=d.text())


def ads_report(pb, d: Draw):
    return "AdsReport", pb.AdsReportRequest(campaign_ids=_texts(d), advertiser=d.text(), from_day=d.text(),
                                            to_day=d.text())


def info(pb, d: Draw):
    return "GetInfo", pb.GetInfoRequest()


BUILDERS: dict[str, Callable[[Any, Draw], tuple[str, Any]]] = {
    "Search": search, "Recommend": recommend, "SimilarItems": similar, "Feedback": feedback,
    "UpsertItems": upsert, "DeleteItems": delete, "ReloadBundle": reload, "GetInfo": info, "Classify": classify,
    "Suggest": suggest, "PutRules": put_rules, "DeleteRules": delete_rules, "PutCampaigns": put_campaigns,
    "SetCampaignStatus": campaign_status, "ListCampaigns": list_campaigns, "AdsReport": ads_report}

# Codes a hostile request may get. Anything else (INTERNAL, UNKNOWN, UNAVAILABLE, a timeout) is a bug.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}


def field_of(err: grpc.RpcError) -> str | None:
    """The field named by the google.rpc.BadRequest detail of a failed call, if any."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return None


def call(stub, rpc: str, request, timeout: float = 30.0) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, details, named field) of one call."""
    try:
        getattr(stub, rpc)(request, timeout=timeout)
        return grpc.StatusCode.OK, "", None
    except grpc.RpcError as err:
        return err.code(), err.details() or "", field_of(err)


def problem(rpc: str, code: grpc.StatusCode, details: str, field: str | None) -> str | None:
    """Why an answer is unacceptable, or None when it is fine."""
    if code not in ACCEPTABLE:
        return f"{rpc}: {code.name} {details!r}"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and not field:
        return f"{rpc}: {code.name} without a named field: {details!r}"
    if code != grpc.StatusCode.OK and not details:
        return f"{rpc}: {code.name} without a message"
    return None
