"""The search engine over one bundle: encode -> dense + lexical candidates -> rerank -> top k.

`search_batch` is the batcher's batch function: one encoder forward pass, one FAISS search and one
kernel pass for the whole batch. `similar` answers SimilarItems. Nothing here knows about gRPC.
"""
from __future__ import annotations

import functools
import logging
import time

import numpy as np

from common.encoding import TextEncoder
from kernels import FEATURE_NAMES
from kernels import features as K
from server.bundle import Bundle
from server.config import ServerConfig
from server.errors import NotFound
from server.listing import LIST_CANDIDATES, RELEVANCE, ListPage, facet_counts, page_of, relevant, sort_keys
from server.ranking import Ranker
from server.retrieval import DenseRetriever, LexicalRetriever, PrefixIndex, filter_mask, split_partial
from server.rules import Fired, boost_mask
from server.types import NO_FILTERS, AdScores, Contribution, Filters, Hit, SearchOutcome, SearchQuery

log = logging.getLogger(__name__)
# SimilarItems: how much co-occurrence (bought/viewed together) adds to the vector-similarity score.
# Small on purpose: similar items stay substitutes first, with complements ordered among them.
SIMILAR_CO_WEIGHT = 0.2
DENSE_FEATURE, COVERAGE_FEATURE = FEATURE_NAMES.index("dense"), FEATURE_NAMES.index("coverage")
ADS_CANDIDATES = 48  # promoted items per query scored by the ranker (the nearest to the query vector)


class SearchEngine:
    """Search and SimilarItems over one loaded bundle."""

    def __init__(self, bundle: Bundle, encoder: TextEncoder, config: ServerConfig) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.config = config
        self.dense = DenseRetriever(bundle, encoder.device, config.exact_filter_max)
        self.lexical = LexicalRetriever(bundle)
        self.ranker = Ranker(bundle)

    @functools.cached_property
    def prefixes(self) -> PrefixIndex:
        """The sorted vocabulary for prefix queries, made by the first one (not by every live catalog change,
        which builds a new engine)."""
        return PrefixIndex(self.bundle.lexical)

    def search_batch(self, queries: list[SearchQuery]) -> list[SearchOutcome]:
        """Answer a batch of validated queries (the batcher's batch function)."""
        t0 = time.perf_counter()
        speller = self.bundle.lexical.speller
        # Spelling correction reads whole words: a prefix query's last word is unfinished by design.
        fixed = [speller.correct(q.text) if speller is not None and not q.prefix else None for q in queries]
        texts = [f or q.text for f, q in zip(fixed, queries)]
        need = [i for i, q in enumerate(queries) if q.listing is None or q.listing.qvec is None]
        qvecs = np.zeros((len(queries), self.encoder.dims), np.float32)
        if need:
            qvecs[need] = self.encoder.encode([texts[i] for i in need], batch_size=max(len(need), 1))
        for i, q in enumerate(queries):
            if q.listing is not None:  # every page of a list scores with the same float16 vector
                src = q.listing.qvec if q.listing.qvec is not None else qvecs[i]
                qvecs[i] = np.asarray(src, np.float16).astype(np.float32)
        t1 = time.perf_counter()
        vectors = self.bundle.vectors
        masks = [self._mask(q.filters) for q in queries]
        ns = [LIST_CANDIDATES if q.listing is not None else max(self.config.candidates, q.k) for q in queries]
        plain = [i for i, q in enumerate(queries) if q.listing is None]
        dense_rows: list[np.ndarray] = [np.empty(0, np.int64)] * len(queries)
        if plain:
            for i, rows in zip(plain, self.dense.search(qvecs[plain], [ns[i] for i in plain], [masks[i] for i in plain])):
                dense_rows[i] = rows
        for i, q in enumerate(queries):
            if q.listing is not None:  # one query at a time: the same candidates whatever shares the batch
                mask = masks[i] if masks[i] is not None else np.ones(len(self.bundle.items), bool)
                dense_rows[i] = self.dense.search_filtered(qvecs[i], ns[i], mask)
        tokens, rank_tokens = zip(*(self._tokens(t, q.prefix) for t, q in zip(texts, queries)))
        fired: list[list[Fired]] = [[] for _ in queries]
        tokens = [self._synonyms(q, t, f) for q, t, f in zip(queries, tokens, fired)]
        hidden = [self._hidden(q) for q in queries]
        bm25 = self.lexical.score(tokens)
        candidates, dense_scores, lex_scores = [], [], []
        for i in range(len(queries)):
            lex_rows = self.lexical.top(bm25[i], ns[i], masks[i])
            rows = np.union1d(dense_rows[i], lex_rows)
            if hidden[i]:
                drop = np.isin(rows, np.fromiter(hidden[i], np.int64))
                fired[i] += [Fired(hidden[i][int(r)], "hide", f"hid {self.bundle.items.ids[int(r)]}") for r in rows[drop]]
                rows = rows[~drop]
            candidates.append(rows)
            dense_scores.append(vectors[rows].astype(np.float32) @ qvecs[i])
            lex_scores.append(bm25[i][rows])
        t2 = time.perf_counter()
        feats, scores, offsets, cand_rows = self.ranker.features(list(rank_tokens), candidates, dense_scores, lex_scores)
        ads = self._score_ads(queries, qvecs, masks, hidden, bm25, rank_tokens, feats, scores, offsets)
        boosted = self._boost(queries, scores, offsets, cand_rows, fired)
        ks = [len(candidates[i]) if q.listing is not None else q.k for i, q in enumerate(queries)]
        out_offsets, positions = K.topk_segments(scores, offsets, np.asarray(ks, dtype=np.int64))
        outcomes = []
        for i, q in enumerate(queries):
            picks = positions[out_offsets[i]:out_offsets[i + 1]]
            out = SearchOutcome([], corrected_query=fixed[i] or "", fired=fired[i], ads=ads[i])
            why = self._explainer(q, feats, boosted)
            if q.listing is None:
                out.hits = [Hit(int(cand_rows[p]), float(scores[p]), why(int(p), float(scores[p]), None))
                            for p in picks]
                if q.rules and q.rules.pins:  # a pinned candidate below the top k keeps its own score and why
                    seg = range(int(offsets[i]), int(offsets[i + 1]))
                    pinned_rows = {self.bundle.items.id_to_row.get(item) for _, item, _ in q.rules.pins}
                    ranked = {int(cand_rows[p]): Hit(int(cand_rows[p]), float(scores[p]), why(p, float(scores[p]), None))
                              for p in seg if int(cand_rows[p]) in pinned_rows}
                    out.hits = self._pin_hits(q, out.hits, masks[i], hidden[i], fired[i], ranked=ranked)
            else:
                best = self._best_dense(qvecs[i], q.filters.active, feats[picks, DENSE_FEATURE])
                out.page = self._page(q, picks, feats, scores, cand_rows, best, masks[i], hidden[i], fired[i])
                out.hits = [Hit(r, s, why(p, s, out.page.pinned.get(r)))
                            for r, s, p in zip(out.page.rows, out.page.scores, out.page.positions)]
                out.qvec = qvecs[i].astype(np.float16)
            outcomes.append(out)
        t3 = time.perf_counter()
        for out in outcomes:
            out.encode_s, out.retrieve_s, out.rank_s = t1 - t0, t2 - t1, t3 - t2
        return outcomes

    def _score_ads(self, queries: list[SearchQuery], qvecs: np.ndarray, masks: list, hidden: list[dict[int, str]],
                   bm25: list[np.ndarray], rank_tokens, feats: np.ndarray, scores: np.ndarray,
                   offsets: np.ndarray) -> list[AdScores | None]:
        """Score each query's promoted items with the organic ranker (one kernel pass for the batch) and say which
        are relevant enough to be shown: in the query's relevant set (every word in the title, or a cosine near the
        best candidate's: server.listing.relevant) and scoring at least what the organic item at rank
        `config.ads_floor_rank` scores. Computed before merchandising boosts: an ad is judged on relevance alone."""
        out: list[AdScores | None] = [None] * len(queries)
        want = [i for i, q in enumerate(queries) if q.ad_rows is not None and len(q.ad_rows)]
        if not want:
            return out
        vectors = self.bundle.vectors
        segs, dense, lex, toks = [], [], [], []
        for i in want:
            rows = np.asarray(queries[i].ad_rows, np.int64)
            if masks[i] is not None:  # an ad obeys the request's filters and live deletions
                rows = rows[masks[i][rows]]
            if hidden[i]:
                rows = rows[~np.isin(rows, np.fromiter(hidden[i], np.int64))]
            d = vectors[rows].astype(np.float32) @ qvecs[i]
            if len(rows) > ADS_CANDIDATES:
                keep = np.argpartition(-d, ADS_CANDIDATES)[:ADS_CANDIDATES]
                rows, d = rows[keep], d[keep]
            segs.append(rows)
            dense.append(d)
            lex.append(bm25[i][rows])
            toks.append(rank_tokens[i])
        a_feats, a_scores, a_off, _ = self.ranker.features(toks, segs, dense, lex)
        floor_rank = max(int(getattr(self.config, "ads_floor_rank", 10)), 1)
        for j, i in enumerate(want):
            s, e = int(offsets[i]), int(offsets[i + 1])
            organic = np.sort(scores[s:e])[::-1]
            best = float(feats[s:e, DENSE_FEATURE].max()) if e > s else 1.0
            a, b = int(a_off[j]), int(a_off[j + 1])
            sc = a_scores[a:b].astype(np.float64)
            floor = float(organic[min(floor_rank, len(organic)) - 1]) if len(organic) else -np.inf
            passes = relevant(a_feats[a:b, DENSE_FEATURE], a_feats[a:b, COVERAGE_FEATURE], best) & (sc >= floor)
            rank = 1 + np.searchsorted(-organic, -sc, side="left")
            out[i] = AdScores(segs[j], sc, passes, rank)
        return out

    def _best_dense(self, q: np.ndarray, filtered: bool, candidates_dense: np.ndarray) -> float:
        """The best cosine of any live item to q (unfiltered candidates hold it; a filtered query looks it up)."""
        if not filtered:
            return float(candidates_dense.max()) if len(candidates_dense) else 1.0
        alive = self.bundle.alive if self.bundle.alive is not None else np.ones(len(self.bundle.items), bool)
        top = self.dense.search_filtered(q, 1, alive)
        return float(self.bundle.vectors[top[0]].astype(np.float32) @ q) if len(top) else 1.0

    def _page(self, q: SearchQuery, picks: np.ndarray, feats: np.ndarray, scores: np.ndarray,
              cand_rows: np.ndarray, best: float, mask: np.ndarray | None, hidden: dict[int, str],
              fired: list[Fired]) -> ListPage:
        """The query's relevant set (ranked picks), sorted, pinned, counted and cut to the requested page."""
        keep = relevant(feats[picks, DENSE_FEATURE], feats[picks, COVERAGE_FEATURE], best)
        picks = picks[keep]
        rows, sc = cand_rows[picks], scores[picks]
        keys = sort_keys(self.bundle.items, self.bundle.popularity, rows, sc, q.listing.sort)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        # (row, score, position among the ranked candidates or -1, sort key), in list order
        entries = [(int(rows[j]), float(sc[j]), int(picks[j]), keys[j]) for j in order]
        pinned: dict[int, str] = {}
        if q.rules and q.rules.pins and q.listing.sort == RELEVANCE:  # pins place items in the relevance order
            hits = self._pin_hits(q, [Hit(r, s) for r, s, _, _ in entries], mask, hidden, fired, limit=None)
            by_row = {e[0]: e for e in entries}
            pinned = {h.row: h.explanation[0].name[5:] for h in hits if h.row not in by_row}
            entries = [by_row.get(h.row) or (h.row, h.score, -1, (0.0, -h.score, self.bundle.items.ids[h.row]))
                       for h in hits]
        keys = [e[3] for e in entries]
        start, stop = page_of(keys, q.listing, q.k, ordered_by_key=not (q.rules and q.rules.pins))
        chosen = entries[start:stop]
        page = ListPage(rows=[e[0] for e in chosen], scores=[e[1] for e in chosen], positions=[e[2] for e in chosen],
                        offset=start, total=len(entries),
                        next_key=keys[stop - 1] if stop < len(keys) and stop > start else None, pinned=pinned)
        if q.listing.facets:
            page.facets = facet_counts(self.bundle.items, np.array([e[0] for e in entries], np.int64), q.listing.facets)
        return page

    # --- merchandising rules -------------------------------------------------------------------
    def _synonyms(self, q: SearchQuery, tokens: np.ndarray, fired: list[Fired]) -> np.ndarray:
        """Retrieval tokens widened by the query's synonym rules."""
        if not (q.rules and q.rules.synonyms):
            return tokens
        extra = [tokens]
        for rule_id, text in q.rules.synonyms:
            extra.append(self.bundle.lexical.token_ids(text))
            fired.append(Fired(rule_id, "synonyms", f"searched also: {text}"))
        return np.unique(np.concatenate(extra)).astype(np.int32)

    def _hidden(self, q: SearchQuery) -> dict[int, str]:
        """Rows the query's hide rules take out -> the rule."""
        if not (q.rules and q.rules.hides):
            return {}
        ids = self.bundle.items.id_to_row
        return {ids[item]: rule_id for rule_id, item in q.rules.hides if item in ids}

    def _boost(self, queries: list[SearchQuery], scores: np.ndarray, offsets: np.ndarray, cand_rows: np.ndarray,
               fired: list[list[Fired]]) -> dict[int, list[tuple[str, float]]]:
        """Add boost and bury weights to the candidates' scores (in place); position -> [(rule, weight)]."""
        boosted: dict[int, list[tuple[str, float]]] = {}
        for i, q in enumerate(queries):
            if not (q.rules and q.rules.boosts):
                continue
            s, e = int(offsets[i]), int(offsets[i + 1])
            for rule_id, field_name, value, weight in q.rules.boosts:
                hit = np.flatnonzero(boost_mask(self.bundle.items, cand_rows[s:e], field_name, value)) + s
                if len(hit):
                    scores[hit] += np.float32(weight)
                    for p in hit.tolist():
                        boosted.setdefault(p, []).append((rule_id, weight))
                    what = "boosted" if weight > 0 else "buried"
                    fired[i].append(Fired(rule_id, "boost", f"{what} {len(hit)} candidates with {field_name} = {value} "
                                                            f"by {weight:+g}"))
        return boosted

    def _explainer(self, q: SearchQuery, feats: np.ndarray, boosted: dict[int, list[tuple[str, float]]]):
        """(candidate position, score, pinning rule) -> the hit's explanation (empty unless asked for); the
        contributions sum to the score, rules included."""
        def why(p: int, score: float, pin_rule: str | None) -> tuple[Contribution, ...]:
            if not q.explain:
                return ()
            if p < 0:  # pinned from outside the candidates: the rule is all there is to say
                return (Contribution(f"rule:{pin_rule}", 1.0, score),)
            return self.ranker.explain(feats[p]) + tuple(Contribution(f"rule:{r}", 1.0, w) for r, w in boosted.get(p, ()))
        return why

    def _pin_hits(self, q: SearchQuery, hits: list[Hit], mask: np.ndarray | None, hidden: dict[int, str],
                  fired: list[Fired], limit: int | None = -1, ranked: dict[int, Hit] | None = None) -> list[Hit]:
        """Place each pinned item (in the catalog, admitted by the filters, not hidden) at its position; `ranked`:
        candidates outside `hits` with their own score and explanation."""
        ids = self.bundle.items.id_to_row
        for rule_id, item_id, position in sorted(q.rules.pins, key=lambda p: (p[2], p[0])):
            row = ids.get(item_id)
            if row is None or row in hidden or (mask is not None and not mask[row]):
                continue
            existing = next((h for h in hits if h.row == row), None)
            if existing is not None:
                hits.remove(existing)
            elif ranked and row in ranked:
                existing = ranked[row]
            at = min(position - 1, len(hits))
            if existing is not None:
                why = existing.explanation + ((Contribution(f"rule:{rule_id}", 1.0, 0.0),) if q.explain else ())
                hit = Hit(row, existing.score, why)
            else:  # not among the candidates: it takes the score of the place it is pinned to
                score = hits[at].score if at < len(hits) else (hits[-1].score if hits else 0.0)
                hit = Hit(row, score, (Contribution(f"rule:{rule_id}", 1.0, score),))
            hits.insert(at, hit)
            fired.append(Fired(rule_id, "pin", f"pinned {item_id} at {at + 1}"))
        return hits[: q.k] if limit == -1 else hits

    def _tokens(self, text: str, prefix: bool) -> tuple[np.ndarray, np.ndarray]:
        """(lexical retrieval tokens, ranking feature tokens) of a query. A prefix query's unfinished last
        word becomes the catalog's words that start with it (the most frequent few) for retrieval, and the
        most frequent one alone for the ranking features (which count the query's words)."""
        lex = self.bundle.lexical
        if prefix:
            head, partial = split_partial(text)
            expansions = self.prefixes.expand(partial) if partial else np.empty(0, np.int32)
            if len(expansions):
                base = lex.token_ids(head) if head.strip() else np.empty(0, np.int32)
                retrieve = np.unique(np.concatenate([base, expansions])).astype(np.int32)
                rank = np.unique(np.concatenate([base, expansions[:1]])).astype(np.int32)
                return retrieve, rank
        ids = lex.token_ids(text)
        return ids, ids

    def _mask(self, filters: Filters) -> np.ndarray | None:
        """The filter's rows, less live deletions (None = everything)."""
        mask = filter_mask(self.bundle.items, filters)
        alive = self.bundle.alive
        if alive is None:
            return mask
        return alive.copy() if mask is None else mask & alive

    def row_of(self, item_id: str) -> int:
        row = self.bundle.items.id_to_row.get(item_id)
        if row is None:
            raise NotFound(f"item_id {item_id!r} is not in the catalog", field="item_id")
        return row

    def similar(self, item_id: str, k: int, filters: Filters = NO_FILTERS, explain: bool = False,
                rec=None) -> list[Hit]:
        """Items most like item_id (never itself): vector neighbours, plus the items bought or viewed
        with it when the bundle has a recommender, reranked with the similar-items weights."""
        source = self.row_of(item_id)
        mask = self._mask(filters)
        mask = np.ones(len(self.bundle.items), dtype=bool) if mask is None else mask.copy()
        mask[source] = False
        q = self.bundle.vectors[source].astype(np.float32)
        rows = self.dense.search_filtered(q, max(self.config.candidates, k), mask)
        co, co_weight = None, 0.0
        if rec is not None:
            extra = rec.co_neighbours(source, self.config.candidates)
            extra = extra[mask[extra]] if len(extra) else extra
            rows = np.union1d(rows, extra)
            co, co_weight = rec.similar_boost(source, rows), float(rec.spec.get("similar_co_weight", SIMILAR_CO_WEIGHT))
        rows = np.sort(rows)
        dense = self.bundle.vectors[rows].astype(np.float32) @ q
        return self.ranker.rank_similar(source, rows, dense, k, explain, co, co_weight)

    def warmup(self) -> None:
        """Compile the kernels and warm the encoder before the bundle takes traffic."""
        started = time.perf_counter()
        some = self.bundle.items.titles[: self.config.max_batch_size] or ["warm up"]
        self.search_batch([SearchQuery(text=t, k=10) for t in some])
        self.search_batch([SearchQuery(text=some[0], k=5, explain=True,
                                       filters=Filters(min_price=0.0, in_stock_only=True))])
        alive_ids = iter(self.bundle.items.id_to_row)
        first = next(alive_ids, None)
        if first is not None:
            self.similar(first, 5)
        log.info("warm-up done in %.2fs", time.perf_counter() - started)
