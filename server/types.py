"""Plain domain types passed between the service layer and the engine (no protobuf below `service`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from server.listing import ListPage, Listing
    from server.rules import Matched


@dataclass(frozen=True)
class Filters:
    """Validated filters; None / empty means 'do not filter on this'."""

    min_price: float | None = None
    max_price: float | None = None
    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()
    in_stock_only: bool = False
    item_ids: tuple[str, ...] = ()
    below_price: float | None = None  # exclusive upper bound (price facet buckets)

    @property
    def active(self) -> bool:
        return (self.min_price is not None or self.max_price is not None or self.below_price is not None
                or bool(self.categories)
                or bool(self.brands) or self.in_stock_only or bool(self.item_ids))


NO_FILTERS = Filters()


@dataclass(frozen=True)
class SearchQuery:
    text: str
    k: int
    filters: Filters = NO_FILTERS
    explain: bool = False
    user_id: str = ""
    prefix: bool = False  # search as you type: the last word may be unfinished
    listing: "Listing | None" = None  # list mode (server.listing)
    rules: "Matched | None" = None  # merchandising rules that match the query (server.rules)
    ad_rows: "np.ndarray | None" = None  # promoted items of the campaigns targeting it: scored beside the organic ones


@dataclass(frozen=True)
class Contribution:
    name: str
    value: float
    contribution: float


@dataclass(frozen=True)
class Hit:
    """One ranked item: its row in the bundle's item table, its score and, when asked, why."""

    row: int
    score: float
    explanation: tuple[Contribution, ...] = ()


@dataclass
class SearchOutcome:
    """A query's hits plus the batch-level stage times (seconds) it shared."""

    hits: list[Hit]
    encode_s: float = 0.0
    retrieve_s: float = 0.0
    rank_s: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    corrected_query: str = ""  # set when spelling correction changed the query
    page: "ListPage | None" = None  # list mode: the page, its position, the set's size and facets
    qvec: "np.ndarray | None" = None  # list mode: the float16 query vector every page of the list uses
    fired: list = field(default_factory=list)  # server.rules.Fired: the rules that changed this answer
    ads: "AdScores | None" = None  # the promoted items scored by the organic ranker (when ad_rows was given)


@dataclass
class AdScores:
    """Promoted items as the organic ranker sees them for one query."""

    rows: "np.ndarray"        # candidate ad rows (at most ADS_CANDIDATES, the nearest to the query)
    scores: "np.ndarray"      # the organic ranker's score of each
    passes: "np.ndarray"      # bool: relevant enough to be shown (the floor: see server.engine)
    organic_rank: "np.ndarray"  # where the organic ranking would have placed each (1 = first)
