"""Query suggestions, the part both sides share: phrases mined from a catalog, their lexical match counts,
and the table the bundle keeps (`suggest/phrases.parquet`).

A suggestion is a normalised phrase (lower case, single spaces) with a weight from the query log (how often
users ran it, `log_count`), a weight from the catalog (how many titles contain it, `catalog_count`), the
number of items that contain its words (`results`, over the same token postings the BM25 index reads: all of
them for one or two words, all but one for longer phrases; spelling-corrected as Search corrects when nothing
matches)
and the most common category among them. The server ranks by `log_count + CATALOG_WEIGHT * (1 - 1 /
(1 + catalog_count))` plus what the live event stream adds (server.suggest): a catalog phrase ranks below
every phrase users searched, and catalog phrases among themselves by how many titles hold them.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from common.text import STOPWORDS, normalize, term_ids

SUGGEST_FILE = "suggest/phrases.parquet"
MAX_CATALOG_PHRASES = 50_000
MAX_NGRAM = 3
CATALOG_WEIGHT = 0.5  # the most a catalog phrase can weigh: below one logged search
_WORDS = re.compile(r"[0-9]+(?:\.[0-9]+)?|[^\W_]+(?:['-][^\W_]+)*", re.UNICODE)
BLOCKLIST_FILE = Path(__file__).with_name("blocklist.txt")


def phrase_key(text: str) -> str:
    """The one spelling of a phrase: normalised words joined by single spaces."""
    return " ".join(_WORDS.findall(normalize(text)))


def load_blocklist(path: Path | None = None) -> frozenset[str]:
    """Words that keep a phrase out of suggestions (one a line, '#' comments)."""
    path = path or BLOCKLIST_FILE
    words = (ln.split("#", 1)[0].strip().lower() for ln in path.read_text(encoding="utf-8").splitlines())
    return frozenset(w for w in words if w)


def is_blocked(phrase: str, blocklist: frozenset[str]) -> bool:
    return any(w in blocklist for w in phrase.split())


def mine_catalog(titles: list[str], categories: list[str], brands: list[str]) -> Counter:
    """Phrases a new catalog can suggest on day one: the 1-3 word n-grams of titles that occur in at least two
    titles (not starting or ending with a stopword), and every category level name and brand; weighted by the
    number of titles that hold them."""
    grams: Counter = Counter()
    for title in titles:
        words = _WORDS.findall(normalize(title))
        seen = set()
        for n in range(1, MAX_NGRAM + 1):
            for i in range(len(words) - n + 1):
                g = words[i:i + n]
                if g[0] in STOPWORDS or g[-1] in STOPWORDS or (n == 1 and g[0].replace(".", "").isdigit()):
                    continue
                seen.add(" ".join(g))
        grams.update(seen)
    phrases = Counter({g: c for g, c in grams.items() if c >= 2})
    for name, count in Counter(categories).items():
        for level in str(name).split(">"):
            key = phrase_key(level)
            if key:
                phrases[key] = max(phrases[key], count)
    for name, count in Counter(brands).items():
        key = phrase_key(name)
        if key:
            phrases[key] = max(phrases[key], count)
    return Counter(dict(phrases.most_common(MAX_CATALOG_PHRASES)))


def matching_rows(phrase: str, vocab: dict[str, int], indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows of the items that contain the phrase's words (the BM25 index's term postings): all of them for a phrase
    of one or two words, all but one for longer ones (a unit, a size or a word the titles spell otherwise: "36
    inch white range hood" finds "36 in. White Range Hood")."""
    ids = term_ids(phrase, vocab)
    n = len(ids)
    if n == 0:
        return np.empty(0, np.int64)
    need = n if n <= 2 else n - 1
    known = ids[ids >= 0]  # a word no item contains is one of the words that can be missing
    if len(known) < need:
        return np.empty(0, np.int64)
    postings = [indices[indptr[t]:indptr[t + 1]] for t in known]
    if need == len(known) == 1:
        return np.asarray(postings[0], np.int64)
    rows, counts = np.unique(np.concatenate(postings), return_counts=True)
    return rows[counts >= need].astype(np.int64)


def phrase_rows(phrase: str, vocab: dict[str, int], indptr: np.ndarray, indices: np.ndarray,
                speller=None) -> np.ndarray:
    """matching_rows of the phrase, or, when it matches nothing and a speller is given, of the phrase as Search
    would correct it ("ceadar fence" has the results of "cedar fence": what a shopper who picks it gets)."""
    rows = matching_rows(phrase, vocab, indptr, indices)
    if len(rows) == 0 and speller is not None:
        fixed = speller.correct(phrase)
        if fixed:
            rows = matching_rows(fixed, vocab, indptr, indices)
    return rows


def top_category(rows: np.ndarray, category_of_row: list[str]) -> str:
    if len(rows) == 0:
        return ""
    counts = Counter(category_of_row[r] for r in rows.tolist() if category_of_row[r])
    if not counts:
        return ""
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)  # ties: alphabetical, so builds agree


def build_table(log_counts: dict[str, float], items: pd.DataFrame, vocab: dict[str, int], indptr: np.ndarray,
                indices: np.ndarray, blocklist: frozenset[str]) -> pd.DataFrame:
    """The bundle's suggestion table: the query log's phrases and the catalog's, with their counts (a phrase's
    results as Search would find them: spelling-corrected, with the bundle's speller, when it matches nothing)."""
    from common.spelling import Speller

    speller = Speller(items["title"].astype(str).tolist(), vocab)
    log = Counter()
    for q, c in log_counts.items():
        key = phrase_key(q)
        if key:
            log[key] += float(c)
    catalog = mine_catalog(items["title"].astype(str).tolist(), items["category"].fillna("").astype(str).tolist(),
                           items["brand"].fillna("").astype(str).tolist())
    cats = items["category"].fillna("").astype(str).tolist()
    texts = sorted(set(log) | set(catalog))
    results, tops = [], []
    for t in texts:
        rows = phrase_rows(t, vocab, indptr, indices, speller)
        results.append(len(rows))
        tops.append(top_category(rows, cats))
    return pd.DataFrame({
        "text": texts,
        "log_count": np.array([log.get(t, 0.0) for t in texts], np.float64),
        "catalog_count": np.array([catalog.get(t, 0) for t in texts], np.float64),
        "results": np.array(results, np.int64),
        "top_category": tops,
        "blocked": np.array([is_blocked(t, blocklist) for t in texts], bool),
    })


def read_query_log(path: Path) -> dict[str, float]:
    """A query log: CSV with a `query` column and an optional `count` column (each row counts once without one;
    a judgments file works: each judged row of a query counts once)."""
    df = pd.read_csv(path, dtype={"query": str})
    if "query" not in df.columns:
        raise ValueError(f"{path}: a query log needs a 'query' column (has {', '.join(df.columns)})")
    df = df.dropna(subset=["query"])
    counts = df["count"].astype(float) if "count" in df.columns else pd.Series(1.0, index=df.index)
    return counts.groupby(df["query"].astype(str)).sum().to_dict()
