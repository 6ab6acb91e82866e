"""Merchandising rules: synonyms, pins, boosts/buries and hidden items, matched against a query.

Rules are plain dicts (the form the log and the store keep, `rule_record`), validated by the service and
compiled here into a `RuleSet` once per change. `RuleSet.match(query)` returns the `Matched` rules a Search
carries into the engine, which applies them: synonyms widen the lexical retrieval, hidden items leave the
candidates, boosts add to the ranker's score before the top k (or the relevant set) is taken, pins place an
item at a position of the relevance order. Every rule that changed an answer is reported (`Fired`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.suggest import phrase_key
from common.text import SEP, normalise_path
from server.bundle import ItemTable

KINDS = ("synonyms", "pin", "boost", "hide")
BOOST_FIELDS = ("brand", "category", "in_stock")  # and attributes.KEY
MAX_RULES = 10_000


@dataclass(frozen=True)
class Fired:
    rule_id: str
    kind: str
    detail: str


@dataclass(frozen=True)
class Matched:
    """The rules that apply to one query."""

    synonyms: tuple[tuple[str, str], ...] = ()  # (rule id, text also searched for)
    pins: tuple[tuple[str, str, int], ...] = ()  # (rule id, item id, 1-based position)
    boosts: tuple[tuple[str, str, str, float], ...] = ()  # (rule id, field, value, weight)
    hides: tuple[tuple[str, str], ...] = ()  # (rule id, item id)

    def __bool__(self) -> bool:
        return bool(self.synonyms or self.pins or self.boosts or self.hides)


NO_RULES = Matched()


def _contains(query: str, phrase: str) -> bool:
    """Does the normalised query hold phrase's words in a row?"""
    return f" {phrase} " in f" {query} "


@dataclass
class RuleSet:
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._exact: dict[str, list[dict]] = {}
        self._contains: list[dict] = []
        self._always: list[dict] = []
        self._synonyms: list[dict] = []
        for r in sorted(self.rules.values(), key=lambda r: r["rule_id"]):
            if r["kind"] == "synonyms":
                self._synonyms.append(r)
            elif not r["query"]:
                self._always.append(r)
            elif r["match"] == "contains":
                self._contains.append(r)
            else:
                self._exact.setdefault(r["query"], []).append(r)

    def match(self, text: str) -> Matched:
        if not self.rules:
            return NO_RULES
        q = phrase_key(text)
        hits = list(self._always) + self._exact.get(q, []) + [r for r in self._contains if _contains(q, r["query"])]
        syn: list[tuple[str, str]] = []
        for r in self._synonyms:
            terms = r["terms"]
            sources = terms[:1] if r["one_way"] else terms
            present = [t for t in sources if _contains(q, t)]
            if present:
                syn += [(r["rule_id"], t) for t in terms if t not in present and not _contains(q, t)]
        return Matched(
            synonyms=tuple(syn),
            pins=tuple((r["rule_id"], r["item_id"], r["position"]) for r in hits if r["kind"] == "pin"),
            boosts=tuple((r["rule_id"], r["field"], r["value"], r["weight"]) for r in hits if r["kind"] == "boost"),
            hides=tuple((r["rule_id"], r["item_id"]) for r in hits if r["kind"] == "hide"),
        )


def boost_mask(items: ItemTable, rows: np.ndarray, field_name: str, value: str) -> np.ndarray:
    """Which of rows have field == value (case-insensitive; a category level admits everything under it)."""
    v = value.strip().lower()
    if field_name == "brand":
        return np.array([items.brands[r].strip().lower() == v for r in rows.tolist()], bool)
    if field_name == "category":
        want = normalise_path(value).lower()
        paths = items.category_paths
        cid = items.category_id[rows]
        return np.array([c >= 0 and (paths[c] == want or paths[c].startswith(want + SEP)) for c in cid.tolist()], bool)
    if field_name == "in_stock":
        return items.in_stock[rows] == (v == "true")
    key = field_name.split(".", 1)[1]
    return np.array([str(items.attributes[r].get(key, "")).strip().lower() == v for r in rows.tolist()], bool)
