"""Suggest: query autocomplete over the bundle's suggestion table plus what the live event stream adds.

Candidates for a prefix, best first:
1. phrases that start with it (the query log's and the catalog's), by weight: how often users searched for
   them (the bundle's log plus every Feedback event since that carries the query: clicks, carts and purchases
   count one search each), then a catalog phrase's share of titles (< 0.5, so below anything users searched);
2. when fewer than k match and the prefix is longer than FUZZY_FROM characters: phrases that start with the
   prefix after one edit (deletion, insertion, substitution or swap of neighbours) past its first FUZZY_FROM
   characters and within its last FUZZY_WINDOW (where the typing is), at half weight (`corrected`);
3. when still fewer than k: the finished words plus a completion of the unfinished last word by the catalog's
   and the log's words (`source` "word"), counted against the lexical index, so "ryobi cordl" offers "ryobi
   cordless" even when nobody searched exactly that.
With a user, suggestions whose top category matches the categories of the user's recent items rank up
(x PERSONAL_BOOST). Phrases with a blocklisted word are left out unless asked for, and so are phrases made up
here (catalog phrases, word completions) that match no item; a phrase users searched stays even when no title
holds its words: the engine answered it (its dense half finds what the words miss).
Everything runs on the event loop (no batching): a call is a few bisections and a small sort.
"""
from __future__ import annotations

import bisect
import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from common.suggest import CATALOG_WEIGHT, is_blocked, load_blocklist, phrase_key
from common.text import normalize

FUZZY_FROM = 3
FUZZY_WINDOW = 12  # an edit is looked for in the last this many characters (where the typing is)
MIN_TYPO_WORD = 4  # ... and in a word at least this long
FUZZY_WEIGHT = 0.5
WORD_WEIGHT = 0.25
PERSONAL_BOOST = 1.5
POOL = 4  # candidates looked at per slot before filters and personalisation
MAX_WORD_COMPLETIONS = 5
_HIGH = "\U0010ffff"


@dataclass
class Suggestion:
    text: str
    results: int
    top_category: str
    score: float
    source: str
    corrected: bool = False
    personalised: bool = False


def prefix_key(prefix: str) -> str:
    """The prefix as phrases are spelled; a trailing space is kept ("drill " is not "drills")."""
    key = phrase_key(prefix)
    last = normalize(prefix)[-1:] if key else ""
    if key and (prefix[-1:].isspace() or not (last.isalnum() or last in "-'")):
        key += " "  # "drill," or "drill " -> the word is finished ("grills-" may go on as "grills-gas")
    return key


def _catalog_weight(count: np.ndarray) -> np.ndarray:
    return CATALOG_WEIGHT * (1.0 - 1.0 / (1.0 + count))


class Suggester:
    """The suggestion table of one bundle, its live counts and a word list for completions."""

    def __init__(self, table: pd.DataFrame, live_counts: dict[str, float],
                 stats: Callable[[str], tuple[int, str]]) -> None:
        self.texts: list[str] = table["text"].astype(str).tolist()  # sorted by the builder
        self._texts_np = np.array(self.texts, dtype=str)  # the same, for looking up hundreds of typo variants at once
        self.row = {t: i for i, t in enumerate(self.texts)}
        log = table["log_count"].to_numpy(np.float64)
        self.base = log + _catalog_weight(table["catalog_count"].to_numpy(np.float64))
        self.live = np.zeros(len(self.texts), np.float64)
        self.results = table["results"].to_numpy(np.int64)
        self.top = table["top_category"].astype(str).tolist()
        self.blocked = table["blocked"].to_numpy(bool)
        self.from_log = log > 0
        self.stats = stats  # phrase -> (matching items, top category) against the served catalog
        self.blocklist = load_blocklist()
        # Phrases first seen in the live event stream: kept sorted beside the table.
        self.extra: list[str] = []
        self.extra_info: dict[str, list] = {}  # text -> [count, results, top_category, blocked]
        words: Counter = Counter()
        for t, w in zip(self.texts, self.base):
            for word in t.split():
                words[word] += w
        self.words = sorted(words)
        self.word_weight = np.array([words[w] for w in self.words], np.float64)
        for text, count in live_counts.items():
            self.observe(text, count)

    def observe(self, query: str, weight: float = 1.0) -> None:
        """A search the event stream reports (a Feedback event's query)."""
        key = phrase_key(query)
        if not key:
            return
        i = self.row.get(key)
        if i is not None:
            self.live[i] += weight
            return
        info = self.extra_info.get(key)
        if info is None:
            # Counted against the catalog when first suggested, not here: a Feedback of 1,000 new queries (or the
            # replay of a long log at start) must not stall the event loop.
            info = self.extra_info[key] = [0.0, None, "", is_blocked(key, self.blocklist)]
            bisect.insort(self.extra, key)
        info[0] += weight

    def suggest(self, prefix: str, k: int, categories: frozenset[str] = frozenset(), include_zero: bool = False,
                include_blocked: bool = False) -> list[Suggestion]:
        p = prefix_key(prefix)
        if not p:
            return []
        pool: dict[str, Suggestion] = {}
        want = POOL * k

        def admit(s: Suggestion, blocked: bool) -> None:
            # A phrase users searched (the log, or an engaged event) led to results in this engine even when no
            # title holds its words (the dense half finds them): only phrases made up here must match an item.
            if (blocked and not include_blocked) or (s.results == 0 and s.source != "log" and not include_zero):
                return
            if s.text not in pool or pool[s.text].score < s.score:
                pool[s.text] = s

        def from_range(key: str, weight: float, corrected: bool) -> None:
            lo = bisect.bisect_left(self.texts, key)
            hi = bisect.bisect_left(self.texts, key + _HIGH, lo)
            if hi > lo:
                score = self.base[lo:hi] + self.live[lo:hi]
                if hi - lo > want:  # the best `want` only, then ordered (ties by text: the table is sorted)
                    top = np.argpartition(-score, want - 1)[:want]
                    picks = top[np.lexsort((top, -score[top]))]
                else:
                    picks = np.argsort(-score, kind="stable")
                for j in picks:
                    i = lo + int(j)
                    admit(Suggestion(self.texts[i], int(self.results[i]), self.top[i], float(score[j]) * weight,
                                     "log" if self.from_log[i] or self.live[i] > 0 else "catalog", corrected),
                          bool(self.blocked[i]))
            lo = bisect.bisect_left(self.extra, key)
            in_range = self.extra[lo:bisect.bisect_left(self.extra, key + _HIGH, lo)]
            if len(in_range) > want:  # the most searched, as for the table
                in_range = heapq.nlargest(want, in_range, key=lambda t: self.extra_info[t][0])
            for text in in_range:
                info = self.extra_info[text]
                if info[1] is None:
                    info[1], info[2] = self.stats(text)
                count, results, top, blocked = info
                admit(Suggestion(text, results, top, count * weight, "log", corrected), blocked)

        from_range(p, 1.0, False)
        if len(pool) < k and len(p) > FUZZY_FROM:
            variants = _edits(p, max(FUZZY_FROM, len(p) - FUZZY_WINDOW))
            if variants and len(self._texts_np):  # one vectorised search; only variants that match go on
                v = np.array(variants, dtype=str)
                lo = np.searchsorted(self._texts_np, v)
                hi = np.searchsorted(self._texts_np, np.char.add(v, _HIGH))
                found = {variants[j] for j in np.flatnonzero(hi > lo)}
            else:
                found = set()
            if self.extra:
                found |= {x for x in variants
                          if bisect.bisect_left(self.extra, x + _HIGH) > bisect.bisect_left(self.extra, x)}
            for variant in sorted(found):
                from_range(variant, FUZZY_WEIGHT, True)
        if len(pool) < k:  # only when the phrases run short: each completion is counted against the catalog
            self._complete_word(p, admit)
        ranked = list(pool.values())
        if categories:
            for s in ranked:
                if s.top_category and _related(s.top_category.lower(), categories):
                    s.score *= PERSONAL_BOOST
                    s.personalised = True
        # What users searched that starts with the prefix as typed comes first (a typo's variants, catalog phrases
        # and completions fill in behind it): typing on should never push the query being typed down.
        ranked.sort(key=lambda s: (not (s.source == "log" and not s.corrected), -s.score, s.text))
        return ranked[:k]

    def _complete_word(self, p: str, admit) -> None:
        head, _, partial = p.rpartition(" ")
        if not partial:
            return
        lo = bisect.bisect_left(self.words, partial)
        hi = bisect.bisect_left(self.words, partial + _HIGH, lo)
        if hi <= lo:
            return
        order = np.argsort(-self.word_weight[lo:hi], kind="stable")[:MAX_WORD_COMPLETIONS]
        for j in order:
            word = self.words[lo + int(j)]
            text = f"{head} {word}" if head else word
            if text in self.row or text in self.extra_info:
                continue  # already a phrase of its own, with its own weight
            results, top = self.stats(text)
            weight = WORD_WEIGHT * (1.0 - 1.0 / (1.0 + float(self.word_weight[lo + int(j)])))
            admit(Suggestion(text, results, top, weight, "word"), is_blocked(text, self.blocklist))


def _related(category: str, wanted: frozenset[str]) -> bool:
    """The same path, or one above or below it."""
    return any(category == w or category.startswith(w + " >") or w.startswith(category + " >") for w in wanted)


_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


def _typo_positions(p: str, keep: int) -> list[int]:
    """Where an edit may fall: past the first `keep` characters, inside a word of at least MIN_TYPO_WORD characters
    (a one- or two-letter word is too short to call a typo: "cordless d" is not "cordless i")."""
    out, start = [], 0
    for word in p.split(" "):
        if len(word) >= MIN_TYPO_WORD:
            out += [i for i in range(start, start + len(word)) if i >= keep]
        start += len(word) + 1
    return out


def _edits(p: str, keep: int) -> list[str]:
    """Every string one edit from p that leaves its first `keep` characters alone and edits a word of at least
    MIN_TYPO_WORD characters (distinct, p excluded)."""
    out = set()
    positions = _typo_positions(p, keep)
    for i in positions:
        out.add(p[:i] + p[i + 1:])  # deletion
        if i + 1 < len(p):
            out.add(p[:i] + p[i + 1] + p[i] + p[i + 2:])  # swap of neighbours
        for c in _ALPHABET:
            out.add(p[:i] + c + p[i + 1:])  # substitution
    for i in positions:  # (an insertion at the end is an extension: the plain prefix covers it)
        for c in _ALPHABET:
            out.add(p[:i] + c + p[i:])  # insertion
    out.discard(p)
    return sorted(out)
