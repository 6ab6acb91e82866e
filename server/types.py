"""Plain domain types passed between the service layer and the engine (no protobuf below `service`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Filters:
    """Validated filters; None / empty means 'do not filter on this'."""

    min_price: float | None = None
    max_price: float | None = None
    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()
    in_stock_only: bool = False
    item_ids: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return (self.min_price is not None or self.max_price is not None or bool(self.categories)
                or bool(self.brands) or self.in_stock_only or bool(self.item_ids))


NO_FILTERS = Filters()


@dataclass(frozen=True)
class SearchQuery:
    text: str
    k: int
    filters: Filters = NO_FILTERS
    explain: bool = False
    user_id: str = ""


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
