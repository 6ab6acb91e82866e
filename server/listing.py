"""List mode of Search: the query's relevant set, sorted, counted into facets and cut into pages.

A list-mode Search (a sort other than relevance, facets, `paged`, a page token or an offset) ranks a deeper,
fixed candidate set than a plain Search (dense top-LIST_CANDIDATES and BM25 top-LIST_CANDIDATES under the
filters) and keeps its **relevant set**: the candidates that contain every query word in their title
(coverage 1) or whose cosine to the query is within DENSE_MARGIN of the best candidate's. Sorting reorders
that set and nothing else, so a price sort never lifts an item that relevance would not have shown; facets
count that set (every item of it, not one page); pages walk it.

Pages are stable: the list is a pure function of the query vector, the words, the filters and the catalog,
so the first page puts the query vector (fp16, the precision every page of the list uses) in its signed
token and later pages reuse it instead of encoding again (a batch's numerics, or another replica's CPU,
could move a near-tie). The token also holds the sort key of the last item shown, and the next page starts
after it (keyset paging): an item added or deleted between pages cannot cause a duplicate.
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from common.text import SEP
from server.bundle import ItemTable
from server.errors import InvalidArgument

LIST_CANDIDATES = 500  # per retriever: a list holds at most 2 x this many items
MAX_LIST_DEPTH = 2 * LIST_CANDIDATES  # the documented depth limit: offsets past it are refused
MAX_PAGE_SIZE = 100
DENSE_MARGIN = 0.15  # cosine below the best candidate's that still counts as relevant without every word
MAX_FACET_VALUES = 100
FACETS = ("category", "brand", "price")
# Price facet buckets: [edge_i, edge_i+1), the last one open-ended; only non-empty buckets are returned.
PRICE_EDGES = (0.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)

RELEVANCE, PRICE_ASC, PRICE_DESC, POPULARITY, NEWEST = 0, 1, 2, 3, 4
SORT_NAMES = {RELEVANCE: "relevance", PRICE_ASC: "price_asc", PRICE_DESC: "price_desc", POPULARITY: "popularity",
              NEWEST: "newest"}
TOKEN_VERSION = 1


@dataclass(frozen=True)
class Listing:
    """What a list-mode Search asks for beyond the query (validated)."""

    sort: int = RELEVANCE
    facets: tuple[str, ...] = ()
    offset: int = 0  # an explicit offset (no token)
    after: tuple | None = None  # the sort key of the last item of the previous page (from the token)
    after_offset: int = 0  # that item's position + 1
    qvec: np.ndarray | None = None  # float16 query vector from the token
    paged: bool = False
    fingerprint: bytes = b""  # list_fingerprint of the request: what its page tokens are bound to


@dataclass(frozen=True)
class FacetCount:
    value: str
    count: int
    level: int = 0
    min_price: float | None = None
    below_price: float | None = None


@dataclass
class ListPage:
    rows: list[int]
    scores: list[float]
    positions: list[int]  # into the ranked candidates (for explanations)
    offset: int
    total: int
    next_key: tuple | None  # sort key of the page's last item when more follow
    facets: dict[str, tuple[list[FacetCount], int]] = field(default_factory=dict)
    pinned: dict[int, str] = field(default_factory=dict)  # rows a pin rule brought in from outside the set -> rule


def relevant(dense: np.ndarray, coverage: np.ndarray, best: float) -> np.ndarray:
    """Which ranked candidates belong to the relevant set: every query word in the title, or a cosine within
    DENSE_MARGIN of `best`, the best cosine of any item of the catalog (not of the filtered ones), so that an
    item's membership does not depend on the filters and a facet's count is what selecting it returns."""
    return (coverage >= 1.0 - 1e-6) | (dense >= best - DENSE_MARGIN)


def sort_keys(items: ItemTable, popularity: np.ndarray, rows: np.ndarray, scores: np.ndarray, sort: int) -> list[tuple]:
    """A total order key per row: (primary, -score, item_id); unknown prices sort last either way."""
    neg = (-scores.astype(np.float64)).tolist()
    ids = [items.ids[r] for r in rows]
    if sort == RELEVANCE:
        primary = [0.0] * len(rows)
    elif sort in (PRICE_ASC, PRICE_DESC):
        p = items.price_exact[rows]
        p = p if sort == PRICE_ASC else -p
        primary = np.where(np.isnan(p), math.inf, p).tolist()
    elif sort == POPULARITY:
        primary = (-popularity[rows].astype(np.float64)).tolist()
    else:  # NEWEST
        primary = (-items.added_ms[rows]).tolist()
    return list(zip(primary, neg, ids))


def facet_counts(items: ItemTable, rows: np.ndarray, wanted: tuple[str, ...]) -> dict[str, tuple[list[FacetCount], int]]:
    """Exact counts over rows: every category path level, brands, price buckets. (values, left out)."""
    out: dict[str, tuple[list[FacetCount], int]] = {}
    if "category" in wanted:
        counts: dict[tuple[int, str], int] = {}
        for cid, n in zip(*np.unique(items.category_id[rows], return_counts=True)):
            if cid < 0:
                continue
            levels = [p.strip() for p in items.category_names_by_id[cid].split(">") if p.strip()]
            for depth in range(len(levels)):
                key = (depth, SEP.join(levels[: depth + 1]))
                counts[key] = counts.get(key, 0) + int(n)
        ordered = sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1]))
        out["category"] = ([FacetCount(v, c, level=d) for (d, v), c in ordered[:MAX_FACET_VALUES]],
                           max(0, len(ordered) - MAX_FACET_VALUES))
    if "brand" in wanted:
        bc = [(items.brand_names_by_id[b], int(n)) for b, n in zip(*np.unique(items.brand_id[rows], return_counts=True))
              if b >= 0]
        bc.sort(key=lambda x: (-x[1], x[0]))
        out["brand"] = ([FacetCount(v, c) for v, c in bc[:MAX_FACET_VALUES]], max(0, len(bc) - MAX_FACET_VALUES))
    if "price" in wanted:
        prices = items.price_exact[rows]
        prices = prices[~np.isnan(prices)]
        buckets = []
        edges = PRICE_EDGES + (math.inf,)
        for lo, hi in zip(edges[:-1], edges[1:]):
            n = int(np.count_nonzero((prices >= lo) & (prices < hi)))
            if n:
                name = f"{lo:g}-{hi:g}" if math.isfinite(hi) else f"{lo:g}+"
                buckets.append(FacetCount(name, n, min_price=lo, below_price=hi if math.isfinite(hi) else None))
        out["price"] = (buckets, 0)
    return out


def page_of(keys: list[tuple], listing: Listing, k: int, ordered_by_key: bool = True) -> tuple[int, int]:
    """(start, stop) positions of the page in the list: right after the previous page's last item (found by its
    id; when it has left the catalog, by its sort key, or at its offset when rules reordered the list)."""
    if listing.after is not None:
        last_id = listing.after[2]
        at = next((i for i, key in enumerate(keys) if key[2] == last_id), None)
        if at is not None:
            start = at + 1
        elif ordered_by_key:
            start = bisect.bisect_right(keys, listing.after)
        else:
            start = min(listing.after_offset, len(keys))
    else:
        start = min(listing.offset, len(keys))
    return start, min(start + k, len(keys))


# --- page tokens --------------------------------------------------------------------------------

def list_fingerprint(text: str, filters, sort: int, prefix: bool) -> bytes:
    """What a page token is bound to besides the bundle: the request fields that define the list."""
    spec = json.dumps([text, sort, prefix, filters.min_price, filters.max_price, filters.below_price,
                       sorted(c.lower() for c in filters.categories), sorted(b.lower() for b in filters.brands),
                       filters.in_stock_only, sorted(filters.item_ids)], separators=(",", ":"))
    return hashlib.sha256(spec.encode()).digest()[:16]


class PageTokens:
    """Issues and checks signed page tokens (HMAC-SHA256 under the server's page key)."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def issue(self, bundle_version: str, fingerprint: bytes, offset: int, key: tuple, qvec: np.ndarray) -> str:
        primary, neg_score, item_id = key
        ident = item_id.encode()
        body = (struct.pack("<BI", TOKEN_VERSION, offset) + hashlib.sha256(bundle_version.encode()).digest()[:8]
                + fingerprint + struct.pack("<ddH", primary, neg_score, len(ident)) + ident
                + np.asarray(qvec, np.float16).tobytes())
        mac = hmac.new(self.key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def read(self, token: str, bundle_version: str, fingerprint: bytes, dims: int) -> tuple[int, tuple, np.ndarray]:
        """(offset of the next item, sort key of the last item shown, query vector) or INVALID_ARGUMENT."""
        bad = InvalidArgument("page_token is not a page token this service issued (damaged, forged, or from a "
                              "server with another page key)", field="page_token")
        if len(token) > 4096:
            raise InvalidArgument(f"page_token is {len(token)} characters; the limit is 4096", field="page_token")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise bad from None
        if len(raw) < 16 + 5:
            raise bad
        body, mac = raw[:-16], raw[-16:]
        if not hmac.compare_digest(mac, hmac.new(self.key, body, hashlib.sha256).digest()[:16]):
            raise bad
        version, offset = struct.unpack_from("<BI", body, 0)
        if version != TOKEN_VERSION:
            raise bad
        if body[5:13] != hashlib.sha256(bundle_version.encode()).digest()[:8]:
            raise InvalidArgument(f"page_token belongs to another bundle; this server now serves {bundle_version}: "
                                  "start again from the first page", field="page_token")
        if body[13:29] != fingerprint:
            raise InvalidArgument("page_token belongs to another list: query, filters, prefix and sort must be the "
                                  "ones of the request that returned it", field="page_token")
        primary, neg_score, n = struct.unpack_from("<ddH", body, 29)
        start = 29 + struct.calcsize("<ddH")
        item_id = body[start:start + n].decode()
        vec = np.frombuffer(body[start + n:], dtype=np.float16)
        if len(vec) != dims:
            raise bad
        if offset > MAX_LIST_DEPTH:
            raise InvalidArgument(f"page_token is past the depth limit of {MAX_LIST_DEPTH} results", field="page_token")
        return offset, (primary, neg_score, item_id), vec
