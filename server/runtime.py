"""One served bundle with its encoder, engine and batcher, and the holder that swaps them atomically.

A request takes `holder.current` once and finishes on that runtime even if a reload swaps in another
meanwhile, so no answer mixes two bundles and every answer names the version it was computed on.
A new bundle is loaded, verified and warmed up off the event loop before the swap; the old
runtime's batcher then drains its queue and stops. Batches of one runtime may run on several compute
threads at once; a live catalog change waits for them and runs alone (its `ComputeGate`).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from common.cpu import cpu_kind
from common.encoding import TextEncoder, resolve_backend
from common.suggest import phrase_rows, top_category
from server.ads.serving import AdServer
from server.ads.tokens import AuctionTokens
from server.batcher import BatcherStats, DynamicBatcher, LoopLag
from server.classify import ServedClassifier
from server.bundle import Bundle, BundleError, load_bundle
from server.config import ServerConfig, compute_plan
from server.engine import SearchEngine
from server.errors import FailedPrecondition
from server.listing import PageTokens
from server.live import apply_changes, passage, pending
from server.recommend import RecEngine
from server.recommend import warm as warm_rec
from server.state import LiveState
from server.rules import RuleSet
from server.store import make_store
from server.suggest import Suggester

log = logging.getLogger(__name__)


def use_threads(n: int) -> None:
    """Threads each compute thread's torch and FAISS calls use (process-wide settings of both)."""
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


class ComputeGate:
    """Shared/exclusive access to one runtime's bundle across compute threads (a readers-writer lock).

    Batches and SimilarItems only read the bundle and run side by side (`shared`); a live catalog change
    grows the FAISS index in place and swaps the engines, so it waits for the running ones and keeps new
    ones out until it is done (`exclusive`). A waiting change goes first, so steady traffic cannot starve it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @property
    def writers_waiting(self) -> int:
        """Catalog changes waiting for the running batches to finish."""
        with self._cond:
            return self._writers_waiting

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class Runtime:
    """One bundle being served. `bundle` and the engines are replaced (on a compute thread, alone, between
    batches) when live catalog changes land; the batchers always call the current engines."""

    bundle: Bundle
    engine: SearchEngine
    batcher: DynamicBatcher
    encoder: TextEncoder
    rec: RecEngine | None = None
    rec_batcher: DynamicBatcher | None = None
    encode_batcher: DynamicBatcher | None = None
    classifier: ServedClassifier | None = None  # the bundle's product classifier, when it has one
    classify_batcher: DynamicBatcher | None = None
    config: ServerConfig | None = None
    gate: ComputeGate = field(default_factory=ComputeGate)
    suggester: Suggester | None = None  # query suggestions, when the bundle has a suggestion table
    live: LiveState | None = None
    _stats_cache: dict = field(default_factory=dict)
    _stats_bundle: Bundle | None = None

    @property
    def version(self) -> str:
        return self.bundle.version

    def _search(self, queries):
        with self.gate.shared():
            return self.engine.search_batch(queries)

    def _recommend(self, queries):
        with self.gate.shared():
            return self.rec.recommend_batch(queries)

    # The encode and classify batchers take one request's texts as one item (an UpsertItems or Classify of up
    # to --max-write-batch entries is one entry of the queue, not hundreds) and run a batch of requests as
    # one pass over all their texts.
    def _encode(self, groups: list[list[str]]) -> list[np.ndarray]:
        texts = [t for g in groups for t in g]
        with self.gate.shared():
            vectors = self.encoder.encode(texts, batch_size=max(1, min(len(texts), ENCODE_CHUNK)))
        return _split(vectors, groups)

    def _classify(self, groups: list[list[str]]) -> list[np.ndarray]:
        texts = [t for g in groups for t in g]
        with self.gate.shared():
            probs = self.classifier.probabilities(texts)
        return _split(probs, groups)

    def similar(self, item_id: str, k: int, filters, explain: bool):
        """SimilarItems on a compute thread, beside the batches."""
        with self.gate.shared():
            return self.engine.similar(item_id, k, filters, explain, self.rec)

    def batchers(self) -> list[DynamicBatcher]:
        return [b for b in (self.batcher, self.rec_batcher, self.encode_batcher, self.classify_batcher)
                if b is not None]

    def apply_live(self, upserts: list[dict], deletes: list[str], vectors: np.ndarray,
                   live_counts: dict[str, float]) -> None:
        """Land catalog changes (on a compute thread, alone): new bundle view, new engines, one swap."""
        with self.gate.exclusive():
            rec_vectors = self.rec.text_vector(vectors) if self.rec is not None else None
            bundle = apply_changes(self.bundle, upserts, deletes, vectors, rec_vectors)
            engine = SearchEngine(bundle, self.encoder, self.config)
            rec = make_rec(bundle, self.encoder.device, self.config, live_counts)
            self.bundle, self.engine, self.rec = bundle, engine, rec

    def phrase_stats(self, phrase: str) -> tuple[int, str]:
        """(items of the served catalog that hold the phrase's words, their most common category); cached until
        the catalog changes (suggestions ask for the same completions keystroke after keystroke)."""
        bundle = self.bundle
        if self._stats_bundle is not bundle:
            self._stats_cache, self._stats_bundle = {}, bundle
        hit = self._stats_cache.get(phrase)
        if hit is None:
            if len(self._stats_cache) >= STATS_CACHE:
                self._stats_cache.clear()
            hit = self._stats_cache[phrase] = self._phrase_stats(bundle, phrase)
        return hit

    @staticmethod
    def _phrase_stats(bundle: Bundle, phrase: str) -> tuple[int, str]:
        lex = bundle.lexical
        rows = phrase_rows(phrase, lex.vocab, lex.bm25_indptr, lex.bm25_indices, lex.speller)
        if bundle.alive is not None and len(rows):
            rows = rows[bundle.alive[rows]]
        return len(rows), top_category(rows, bundle.items.categories)

    def start(self) -> None:
        for b in self.batchers():
            b.start()
        if self.suggester is not None and self.live is not None:
            self.live.query_listeners.append(self.suggester.observe)

    async def close(self) -> None:
        if self.suggester is not None and self.live is not None and self.suggester.observe in self.live.query_listeners:
            self.live.query_listeners.remove(self.suggester.observe)
        for b in self.batchers():
            await b.close()


STATS_CACHE = 100_000  # phrases whose catalog counts a runtime keeps
ENCODE_CHUNK = 64  # texts per encoder forward pass when one batch holds many (attention memory grows with it)


def _split(rows: np.ndarray, groups: list[list[str]]) -> list[np.ndarray]:
    """Rows of a flattened batch back into one array per request."""
    cuts = np.cumsum([len(g) for g in groups])[:-1]
    return np.split(np.asarray(rows), cuts)


def make_rec(bundle: Bundle, device: str, config: ServerConfig, live_counts: dict[str, float]) -> RecEngine | None:
    if bundle.rec is None:
        return None
    rec = RecEngine(bundle, device, config.rec_candidates)
    ids = bundle.items.id_to_row
    for item_id, count in live_counts.items():
        row = ids.get(item_id)
        if row is not None:
            rec.live_popularity[row] += count
    return rec


def encoder_digests(bundle: Bundle) -> dict[str, str] | None:
    """The encoder files' sha256 as the manifest records them (load_bundle has just verified them);
    None when it does not list them (the encoder then hashes the files itself)."""
    files, prefix = bundle.manifest["files"], str(bundle.encoder.get("path", "encoder")).rstrip("/") + "/"
    try:
        return {name: files[prefix + name] for name in ("config.json", "model.safetensors")}
    except KeyError:
        return None


def land_pending(runtime: Runtime, live: LiveState) -> None:
    """Land the live catalog changes a runtime's bundle does not reflect yet (blocking; off the event loop)."""
    changes = dict(live.items)  # a copy: the event loop may record more changes meanwhile
    if not changes:
        return
    ups, dels = pending(runtime.bundle, changes)
    if ups or dels:
        enc = runtime.encoder
        vecs = enc.encode([passage(u) for u in ups], batch_size=64) if ups else np.zeros((0, enc.dims), np.float32)
        runtime.apply_live(ups, dels, vecs, dict(live.item_counts))
        log.info("live catalog changes applied to %s: %d upserts, %d deletes", runtime.version, len(ups), len(dels))


def build_runtime(path: Path, config: ServerConfig, device: str, dtype: str,
                  executor: Executor, stats: BatcherStats, live: LiveState | None = None,
                  rec_stats: BatcherStats | None = None, encode_stats: BatcherStats | None = None,
                  lag: LoopLag | None = None, workers: int = 1,
                  classify_stats: BatcherStats | None = None) -> Runtime:
    """Load, verify and warm a bundle and land the live catalog changes it lacks (blocking; run it
    off the event loop)."""
    started = time.perf_counter()
    bundle = load_bundle(path)
    enc = bundle.encoder
    encoder = TextEncoder(bundle.encoder_dir, device=device, dtype=dtype, max_length=int(enc.get("max_length", 128)),
                          pooling=enc.get("pooling", "mean"), normalize=bool(enc.get("normalize", True)),
                          trace=config.encoder_trace, graph_cache=config.encoder_cache, digests=encoder_digests(bundle),
                          backend=resolve_backend(device, config.backend, dtype), threads=compute_plan(config)[1])
    if encoder.dims != int(enc["dims"]):
        raise BundleError(f"{path}: encoder produces {encoder.dims}-d vectors, manifest says {enc['dims']}")
    counts = dict(live.item_counts) if live is not None else {}
    engine = SearchEngine(bundle, encoder, config)
    runtime = Runtime(bundle, engine, None, encoder, make_rec(bundle, device, config, counts), config=config)  # type: ignore[arg-type]
    if "classifier" in bundle.manifest:  # its files were verified with the rest of the bundle
        runtime.classifier = ServedClassifier.load(bundle.path, bundle.manifest["files"], device, dtype,
                                                   config.autofill_threshold, config.encoder_trace,
                                                   config.encoder_cache)
    if live is not None:
        land_pending(runtime, live)
    runtime.live = live
    if bundle.suggest is not None:
        runtime.suggester = Suggester(bundle.suggest, dict(live.query_counts) if live is not None else {},
                                      runtime.phrase_stats)
    if config.warmup:
        runtime.engine.warmup()
        if runtime.rec is not None:
            warm_rec(runtime.rec)
        if runtime.classifier is not None:
            runtime.classifier.warmup()
    name = bundle.version
    shared = dict(max_batch_size=config.max_batch_size, max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                  executor=executor, lag=lag, admit_fraction=config.admit_fraction, concurrency=workers,
                  idle_wait=config.batch_idle_wait)
    runtime.batcher = DynamicBatcher(runtime._search, stats=stats, name=f"search[{name}]", **shared)
    if runtime.rec is not None:
        runtime.rec_batcher = DynamicBatcher(runtime._recommend, stats=rec_stats or BatcherStats(),
                                             name=f"recommend[{name}]", **shared)
    runtime.encode_batcher = DynamicBatcher(runtime._encode, stats=encode_stats or BatcherStats(),
                                            name=f"encode[{name}]", **shared)
    if runtime.classifier is not None:
        runtime.classify_batcher = DynamicBatcher(runtime._classify, stats=classify_stats or BatcherStats(),
                                                  name=f"classify[{name}]", **shared)
    small = "none" if bundle.scan_index is None else (
        f"{type(bundle.scan_index).__name__} up to {bundle.scan_batch_max} queries")
    log.info("bundle %s ready in %.2fs: %d items, index %s (small batches: %s), recommender %s, classifier %s, "
             "device %s/%s/%s", bundle.version, time.perf_counter() - started, len(bundle.items), bundle.index_type,
             small, "yes" if runtime.rec is not None else "no",
             "yes" if runtime.classifier is not None else "no", device, encoder.backend, dtype)
    return runtime


def settle_heap() -> None:
    """Move everything alive now out of the cyclic garbage collector's sight (gc.freeze) once a bundle is in
    place: its hundreds of thousands of strings, dicts and arrays are never garbage, but every full collection
    walked them, stalling the event loop for tens of milliseconds at random (Suggest's p99 at 100 calls/s on the
    Home Depot bundle came from those pauses). Unfrozen and collected first, so a swapped-out bundle (its
    batchers and runtime refer to each other) is freed, not kept for ever."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class RuntimeHolder:
    """Holds the runtime being served and swaps in new ones."""

    def __init__(self, config: ServerConfig, device: str, dtype: str, compute: Executor, loader: Executor,
                 workers: int = 1) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.cpu = cpu_kind()  # reported by GetInfo and metrics beside the dtype it led to
        self.compute = compute
        self.workers = workers  # threads of `compute`: batches of one batcher run this many at once
        self.loader = loader
        # Cumulative over reloads, one per batcher kind.
        self.stats = BatcherStats()
        self.rec_stats = BatcherStats()
        self.encode_stats = BatcherStats()
        self.classify_stats = BatcherStats()
        self.lag = LoopLag()  # event-loop lag, for deadline-aware admission
        # The in-memory view of the state: with the local store it is the state (replayed from its log);
        # with a shared store it is this replica's copy of the catalog changes and counters, and a cache of
        # users' recent events that reads fall back on while the store is unreachable.
        self.live = None
        if config.state_dir or config.state:
            self.live = LiveState(None if config.state else config.state_dir, config.max_user_events,
                                  fsync=config.fsync, max_users=config.max_live_users, ads_day_s=config.ads_day_s, ads_day_start_ms=config.ads_day_start_ms)
        self.store = make_store(config, self.live)
        self._rules, self._rules_version = RuleSet(), 0
        self.page_tokens = PageTokens(os.urandom(32))  # replaced at start by the store's key (server.app)
        # Sponsored products need a store (billing is durable); the auction-id key is the store's (server.app).
        self.ads = AdServer(self.live, config, AuctionTokens(os.urandom(32))) if self.live is not None else None
        self.catalog_lock = asyncio.Lock()  # catalog changes and reloads never interleave
        self._current: Runtime | None = None
        # The bundle path as given (not resolved): re-reading it after a deploy tool re-points a
        # symlink picks up the new bundle (SIGHUP, or ReloadBundle with an empty path).
        self.source: Path | None = None
        self._lock = asyncio.Lock()

    @property
    def rules(self) -> RuleSet:
        """The merchandising rules as they stand (compiled again after each change)."""
        live = self.live
        if live is None:
            return self._rules
        if self._rules_version != live.rules_version:
            self._rules, self._rules_version = RuleSet(dict(live.rules)), live.rules_version
        return self._rules

    @property
    def current(self) -> Runtime:
        if self._current is None:
            raise RuntimeError("no bundle loaded")
        return self._current

    async def _build(self, path: Path) -> Runtime:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.loader, build_runtime, path, self.config, self.device, self.dtype, self.compute, self.stats,
            self.live, self.rec_stats, self.encode_stats, self.lag, self.workers, self.classify_stats)

    async def load_initial(self, path: Path) -> Runtime:
        self.lag.start()
        runtime = await self._build(path)
        runtime.start()
        self._current, self.source = runtime, Path(path)
        settle_heap()
        return runtime

    async def reload(self, path: Path | None) -> tuple[Runtime, Runtime, float]:
        """Swap in the bundle at path (None = the one being served, re-read). Returns (new, old, seconds).

        Raises FailedPrecondition if the bundle cannot be served; the old one keeps serving.
        """
        async with self._lock, self.catalog_lock:
            old = self.current
            target = path or self.source or old.bundle.path
            started = time.perf_counter()
            try:
                new = await self._build(target)
            except (BundleError, OSError) as exc:  # OSError: a path the file system cannot even look up
                log.warning("reload refused: %s", exc)
                raise FailedPrecondition(f"bundle refused, still serving {old.version}: {exc}", field="path") from exc
            await self.swap(new, Path(target))
            seconds = time.perf_counter() - started
            log.info("swapped bundle %s -> %s in %.2fs", old.version, new.version, seconds)
            return new, old, seconds

    async def swap(self, new: Runtime, path: Path) -> None:
        """Serve `new` from now on; the old runtime drains its in-flight requests and stops."""
        old = self.current
        new.start()
        self._current, self.source = new, Path(path)  # the swap: requests from here on take the new runtime
        await old.close()  # in-flight requests finish on the old bundle
        settle_heap()

    async def close(self) -> None:
        await self.lag.close()
        if self._current is not None:
            await self._current.close()
        if self.store is not None:
            await self.store.close()
        elif self.live is not None:
            self.live.close()
