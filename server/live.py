"""Live catalog changes applied to a loaded bundle: append-only rows plus tombstones.

An upserted item gets a new row at the end of every per-item structure (item table, dense vectors
and FAISS index, lexical postings, popularity, recommender vectors); a changed item's old row and a
deleted item's row are tombstoned (`Bundle.alive`) and dropped from `id_to_row`, so every RPC stops
returning them. Rows never move, so a row resolved by a request stays valid while changes land.
BM25 weights of new items use the bundle's own term statistics (as a new index segment would).

`apply_changes` returns a new Bundle (the old one is untouched except for the FAISS index, which
grows in place; that is why it runs on a compute thread with no batch beside it: `ComputeGate.exclusive`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from common.text import number_tokens, tokenize
from server.bundle import Bundle, ItemTable, LexicalIndex, add_to_small_batch_index, build_item_table

def passage(item: dict[str, Any]) -> str:
    """The text an item is encoded from (the bundle writer's passage: title. brand. category. description)."""
    return ". ".join(p for p in (item.get("title"), item.get("brand"), item.get("category"), item.get("description")) if p)


def _lexical_text(item: dict[str, Any]) -> str:
    return " ".join(p for p in (item.get("title"), item.get("brand"), item.get("category"), item.get("description")) if p)


def same_item(items: ItemTable, row: int, item: dict[str, Any]) -> bool:
    """Does the bundle row already hold exactly these fields?"""
    price = item.get("price")
    have = float(items.price_exact[row])
    same_price = (price is None and math.isnan(have)) or (price is not None and float(price) == have)
    return (items.titles[row] == item["title"] and items.categories[row] == item.get("category", "")
            and bool(items.category_predicted[row]) == bool(item.get("category_predicted"))
            and items.brands[row] == item.get("brand", "") and bool(items.in_stock[row]) == bool(item.get("in_stock"))
            and same_price)


def pending(bundle: Bundle, changes: dict[str, dict[str, Any] | None]) -> tuple[list[dict[str, Any]], list[str]]:
    """The upserts and deletes that this bundle does not already reflect."""
    ids = bundle.items.id_to_row
    ups = [it for i, it in changes.items() if it is not None and not (i in ids and same_item(bundle.items, ids[i], it))]
    dels = [i for i, it in changes.items() if it is None and i in ids]
    return ups, dels


def _append_lexical(lex: LexicalIndex, texts: list[str], titles: list[str], first_row: int, k1: float, b: float,
                    avgdl: float) -> LexicalIndex:
    vocab = dict(lex.vocab)
    words_before = len(vocab)
    n_docs = first_row + len(texts)
    df = np.diff(lex.bm25_indptr).astype(np.float64)
    entries: list[tuple[int, int, float]] = []
    doc_terms = []
    for text in texts:
        toks = tokenize(text)
        for t in toks:
            vocab.setdefault(t, len(vocab))
        counts: dict[int, int] = {}
        for t in toks:
            counts[vocab[t]] = counts.get(vocab[t], 0) + 1
        doc_terms.append((counts, len(toks)))
    df = np.concatenate([df, np.zeros(len(vocab) - words_before)])
    for counts, _ in doc_terms:
        for t in counts:
            df[t] += 1
    for j, (counts, length) in enumerate(doc_terms):
        norm = k1 * ((1 - b) + b * length / max(avgdl, 1e-6))
        for t, tf in counts.items():
            idf = math.log(1 + (n_docs - df[t] + 0.5) / (df[t] + 0.5))
            entries.append((t, first_row + j, float(idf * tf / (norm + tf))))
    entries.sort()
    indptr = np.concatenate([lex.bm25_indptr, np.full(len(vocab) - words_before, lex.bm25_indptr[-1])])
    indices, data = lex.bm25_indices, lex.bm25_data
    if entries:
        terms = np.array([e[0] for e in entries], np.int64)
        docs = np.array([e[1] for e in entries], np.int32)
        vals = np.array([e[2] for e in entries], np.float32)
        pos = indptr[terms + 1]  # end of each term's postings: new docs have the largest rows
        indices = np.insert(indices, pos, docs)
        data = np.insert(data, pos, vals)
        added = np.bincount(terms, minlength=len(vocab))
        indptr = indptr + np.concatenate([[0], np.cumsum(added)])
    title_lists = [sorted({vocab[t] for t in tokenize(tt) if t in vocab}) for tt in titles]
    t_indptr = np.concatenate([lex.title_indptr, lex.title_indptr[-1] + np.cumsum([len(x) for x in title_lists])])
    t_tokens = np.concatenate([lex.title_tokens, np.array([t for x in title_lists for t in x], np.int32)])
    words = [""] * len(vocab)
    for w, i in vocab.items():
        words[i] = w
    return LexicalIndex(vocab, indptr.astype(np.int64), indices.astype(np.int32), data.astype(np.float32),
                        t_indptr.astype(np.int64), t_tokens.astype(np.int32), number_tokens(words),
                        None if lex.speller is None else lex.speller.with_titles(titles, words))


def _frame(items: ItemTable) -> pd.DataFrame:
    return pd.DataFrame({"item_id": items.ids, "title": items.titles, "category": items.categories,
                         "brand": items.brands, "price": items.price_exact, "in_stock": items.in_stock,
                         "category_predicted": items.category_predicted, "added_ms": items.added_ms,
                         "attributes": items.attributes})


def apply_changes(bundle: Bundle, upserts: list[dict[str, Any]], deletes: list[str], vectors: np.ndarray,
                  rec_vectors: np.ndarray | None) -> Bundle:
    """A bundle with upserts appended (vectors: their encoder vectors, in order) and deletes tombstoned."""
    items = bundle.items
    n0 = len(items)
    alive = np.ones(n0, bool) if bundle.alive is None else bundle.alive.copy()
    dead = [items.id_to_row[i] for i in deletes if i in items.id_to_row]
    dead += [items.id_to_row[it["item_id"]] for it in upserts if it["item_id"] in items.id_to_row]
    alive[dead] = False
    if upserts:
        new = pd.DataFrame({
            "item_id": [it["item_id"] for it in upserts], "title": [it["title"] for it in upserts],
            "category": [it.get("category", "") for it in upserts], "brand": [it.get("brand", "") for it in upserts],
            "price": [np.nan if it.get("price") is None else float(it["price"]) for it in upserts],
            "in_stock": [bool(it.get("in_stock")) for it in upserts],
            "category_predicted": [bool(it.get("category_predicted")) for it in upserts],
            "added_ms": [float(it.get("added_ms") or 0.0) for it in upserts],
            "attributes": [dict(it.get("attributes") or {}) for it in upserts]})
        frame = pd.concat([_frame(items), new], ignore_index=True)
        lex_cfg = bundle.manifest["lexical"]
        avgdl = float(lex_cfg.get("avgdl") or max(float(np.diff(bundle.lexical.title_indptr).mean()), 1.0))
        lexical = _append_lexical(bundle.lexical, [_lexical_text(it) for it in upserts], list(new["title"]), n0,
                                  float(lex_cfg.get("k1", 1.2)), float(lex_cfg.get("b", 0.75)), avgdl)
        # Ids are unique per row in the frame; a changed item's id points at its new row.
        table = build_item_table(frame, lexical.vocab)
        bundle.index.add(np.ascontiguousarray(vectors, dtype=np.float32))  # in place: under the runtime's exclusive gate
        if bundle.scan_index is not None:
            add_to_small_batch_index(bundle.scan_index, vectors.astype(np.float16))
        all_vectors = np.concatenate([bundle.vectors, vectors.astype(bundle.vectors.dtype)])
        popularity = np.concatenate([bundle.popularity, np.zeros(len(upserts), np.float32)])
        alive = np.concatenate([alive, np.ones(len(upserts), bool)])
        rec = bundle.rec
        if rec is not None and rec_vectors is not None:
            k = len(upserts)
            rec = dataclasses.replace(
                rec, vectors=np.concatenate([rec.vectors, rec_vectors.astype(np.float32)]),
                popularity=np.concatenate([rec.popularity, np.zeros(k, np.float32)]),
                co_indptr=np.concatenate([rec.co_indptr, np.full(k, rec.co_indptr[-1])]))
        bundle = dataclasses.replace(bundle, items=table, vectors=all_vectors, lexical=lexical, popularity=popularity,
                                     rec=rec)
    # Tombstoned rows keep their data (answers already computed may name them) but leave the id map.
    id_to_row = {i: r for r, i in enumerate(bundle.items.ids) if alive[r]}
    table = dataclasses.replace(bundle.items, id_to_row=id_to_row)
    return dataclasses.replace(bundle, items=table, alive=alive)

