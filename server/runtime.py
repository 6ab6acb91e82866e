"""One served bundle with its encoder, engine and batcher, and the holder that swaps them atomically.

A request takes `holder.current` once and finishes on that runtime even if a reload swaps in another
meanwhile, so no answer mixes two bundles and every answer names the version it was computed on.
A new bundle is loaded, verified and warmed up off the event loop before the swap; the old
runtime's batcher then drains its queue and stops.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from common.encoding import TextEncoder
from server.batcher import BatcherStats, DynamicBatcher
from server.bundle import Bundle, BundleError, load_bundle
from server.config import ServerConfig
from server.engine import SearchEngine
from server.errors import FailedPrecondition

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    bundle: Bundle
    engine: SearchEngine
    batcher: DynamicBatcher

    @property
    def version(self) -> str:
        return self.bundle.version


def build_runtime(path: Path, config: ServerConfig, device: str, dtype: str,
                  executor: Executor, stats: BatcherStats) -> Runtime:
    """Load, verify and warm a bundle (blocking; run it off the event loop)."""
    started = time.perf_counter()
    bundle = load_bundle(path)
    enc = bundle.encoder
    encoder = TextEncoder(bundle.encoder_dir, device=device, dtype=dtype, max_length=int(enc.get("max_length", 128)),
                          pooling=enc.get("pooling", "mean"), normalize=bool(enc.get("normalize", True)))
    if encoder.dims != int(enc["dims"]):
        raise BundleError(f"{path}: encoder produces {encoder.dims}-d vectors, manifest says {enc['dims']}")
    engine = SearchEngine(bundle, encoder, config)
    if config.warmup:
        engine.warmup()
    batcher = DynamicBatcher(engine.search_batch, max_batch_size=config.max_batch_size,
                             max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                             executor=executor, stats=stats, name=f"search[{bundle.version}]")
    log.info("bundle %s ready in %.2fs: %d items, index %s, device %s/%s", bundle.version,
             time.perf_counter() - started, len(bundle.items), bundle.index_type, device, dtype)
    return Runtime(bundle, engine, batcher)


class RuntimeHolder:
    """Holds the runtime being served and swaps in new ones."""

    def __init__(self, config: ServerConfig, device: str, dtype: str, compute: Executor, loader: Executor) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.compute = compute
        self.loader = loader
        self.stats = BatcherStats()
        self._current: Runtime | None = None
        self._lock = asyncio.Lock()
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)

    @property
    def current(self) -> Runtime:
        if self._current is None:
            raise RuntimeError("no bundle loaded")
        return self._current

    async def _build(self, path: Path) -> Runtime:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.loader, build_runtime, path, self.config, self.device, self.dtype, self.compute, self.stats)

    async def load_initial(self, path: Path) -> Runtime:
        runtime = await self._build(path)
        runtime.batcher.start()
        self._current = runtime
        return runtime

    async def reload(self, path: Path | None) -> tuple[Runtime, Runtime, float]:
        """Swap in the bundle at path (None = the one being served, re-read). Returns (new, old, seconds).

        Raises FailedPrecondition if the bundle cannot be served; the old one keeps serving.
        """
        async with self._lock:
            old = self.current
            target = path or old.bundle.path
            started = time.perf_counter()
            try:
                new = await self._build(target)
            except BundleError as exc:
                log.warning("reload refused: %s", exc)
                raise FailedPrecondition(f"bundle refused, still serving {old.version}: {exc}", field="path") from exc
            new.batcher.start()
            self._current = new  # the swap: requests from here on take the new runtime
            await old.batcher.close()  # in-flight requests finish on the old bundle
            seconds = time.perf_counter() - started
            log.info("swapped bundle %s -> %s in %.2fs", old.version, new.version, seconds)
            return new, old, seconds

    async def close(self) -> None:
        if self._current is not None:
            await self._current.batcher.close()
