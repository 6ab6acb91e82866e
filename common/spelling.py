"""Query spelling correction against the catalog's own words (shoppers misspell; titles rarely do).

About one Home Depot query in five holds a word that no product title contains ("ceadar", "fiepits",
"deckpaint"); BM25 scores such a word zero and the encoder sees odd word pieces. The dictionary is
every alphabetic word of the catalog's titles with the number of titles it occurs in. A query word
is left alone when the dictionary knows it, when its stem is in the lexical vocabulary (plurals), when
it holds a digit (sizes and model numbers are not typos) or when it is shorter than 4 letters.
Otherwise it becomes the most frequent dictionary word with the same first letter (people rarely miss
that one) at Damerau-Levenshtein distance 1, else the
best split into two dictionary words ("thewall" -> "the wall"), else the most frequent word at
distance 2 (words of 6+ letters only). Lookups use a symmetric-delete index (SymSpell's idea):
a word and its single-deletion variants are the keys, so candidates within distance 2 are found
with a few dictionary probes instead of a scan.

The server and the trainer both call `Speller.correct`, so the reranker learns on the same
corrected queries the server answers.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from common.text import STOPWORDS, normalize, tokenize

_ALPHA = re.compile(r"[^\W\d_]+", re.UNICODE)
_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)?|[^\W_]+", re.UNICODE)
MIN_LENGTH = 4  # shorter words have too many neighbours to guess from
MIN_COUNT = 2  # a word in a single title may itself be a typo


def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1:] for i in range(len(word))}


def distance(a: str, b: str, limit: int = 2) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance, or limit + 1 when it exceeds limit."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1] if prev[-1] <= limit else limit + 1


class Speller:
    """Corrects query words to catalog words; built from item titles in well under a second per 50k titles."""

    def __init__(self, titles: Iterable[str], vocabulary: Iterable[str] = ()) -> None:
        counts: Counter[str] = Counter()
        for title in titles:
            counts.update(set(_ALPHA.findall(normalize(title))))
        self.counts = {w: c for w, c in counts.items() if len(w) >= 2}
        self.vocabulary = set(vocabulary)  # stemmed lexical tokens: a word whose stem is known is not a typo
        self._index: dict[str, list[str]] = {}
        for w, c in self.counts.items():
            if c >= MIN_COUNT and len(w) >= MIN_LENGTH - 1:
                for key in _deletes(w) | {w}:
                    self._index.setdefault(key, []).append(w)

    def with_titles(self, titles: Iterable[str], vocabulary: Iterable[str] = ()) -> Speller:
        """A copy that also knows the words of titles (live catalog updates); this one is left unchanged."""
        new = object.__new__(Speller)
        new.counts = dict(self.counts)
        new.vocabulary = self.vocabulary | set(vocabulary)
        new._index = dict(self._index)
        added: Counter[str] = Counter()
        for title in titles:
            added.update(w for w in set(_ALPHA.findall(normalize(title))) if len(w) >= 2)
        for w, c in added.items():
            before = new.counts.get(w, 0)
            new.counts[w] = before + c
            if before < MIN_COUNT <= before + c and len(w) >= MIN_LENGTH - 1:
                for key in _deletes(w) | {w}:
                    new._index[key] = [*new._index.get(key, ()), w]  # copied, never appended in place
        return new

    def known(self, word: str) -> bool:
        if word in self.counts or word in STOPWORDS:
            return True
        stems = tokenize(word)
        return bool(stems) and all(s in self.vocabulary for s in stems)

    def _candidates(self, word: str) -> list[str]:
        found: set[str] = set()
        for key in _deletes(word) | {word}:
            found.update(self._index.get(key, ()))
        return list(found)

    def correct_word(self, word: str) -> str | None:
        """The correction of one lower-case word, or None when it is left as it is."""
        if len(word) < MIN_LENGTH or any(ch.isdigit() for ch in word) or self.known(word):
            return None
        cands = self._candidates(word)
        best: dict[int, tuple[int, str]] = {}
        for c in cands:
            # Shoppers rarely miss the first letter ("hire" is not "wire"); a swap of the first two is allowed.
            if c[0] != word[0] and c[:2] != word[1::-1]:
                continue
            d = distance(word, c)
            if d <= 2 and (d not in best or (self.counts[c], c) > best[d]):
                best[d] = (self.counts[c], c)
        if 1 in best:
            return best[1][1]
        split = self._split(word)
        if split is not None:
            return split
        if 2 in best and len(word) >= 6:
            return best[2][1]
        return None

    def _split(self, word: str) -> str | None:
        best: tuple[int, str] | None = None
        for i in range(2, len(word) - 1):
            left, right = word[:i], word[i:]
            lc = self.counts.get(left, 0) if left not in STOPWORDS else max(self.counts.get(left, 0), MIN_COUNT)
            rc = self.counts.get(right, 0)
            if min(len(left), len(right)) >= 3 or left in STOPWORDS:
                score = min(lc, rc)
                if score >= MIN_COUNT and (best is None or score > best[0]):
                    best = (score, f"{left} {right}")
        return best[1] if best else None

    def correct(self, query: str) -> str | None:
        """The query with its misspelt words corrected (normalised text), or None when nothing changed."""
        text = normalize(query)
        changed = False

        def fix(m: re.Match) -> str:
            nonlocal changed
            new = self.correct_word(m.group(0))
            if new is None:
                return m.group(0)
            changed = True
            return new

        out = _TOKEN.sub(fix, text)
        return out if changed else None
