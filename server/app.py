"""Wire the gRPC server: device policy, bundle runtime, service, health, reflection, shutdown.

`create_server(config) -> (server, port)` starts a server on the running event loop; tests bind
port 0. Shutdown: health NOT_SERVING -> stop accepting -> in-flight calls finish within the grace
period -> the batcher drains -> executors stop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.encoding import resolve_backend, resolve_device, resolve_dtype
from server import IMPORTED_AT
from server.ads.tokens import AuctionTokens
from server.access import Gatekeeper, Pseudonymiser, load_tokens, server_credentials
from server.config import ServerConfig, compute_plan
from server.metrics import Metrics
from server.listing import PageTokens
from server.replica import Replica
from server.runtime import RuntimeHolder, use_threads
from server.service import SearchRecommendService, add_to_server
from server.stubs import SERVICE_NAME

log = logging.getLogger(__name__)


class SearchrecServer:
    """A running searchrec server: the grpc.aio server plus what it serves."""

    def __init__(self, config: ServerConfig) -> None:
        # Fails fast (DeviceError) when cuda is asked for and absent, or onnx where it cannot run: never
        # a silent fallback. The config carries the resolved engine from here on (runtimes and swaps use it).
        self.device = resolve_device(config.device)
        config = replace(config, backend=resolve_backend(self.device, config.backend, config.dtype))
        self.config = config
        self.dtype = resolve_dtype(self.device, config.dtype, config.backend)
        # Batches run off the event loop on `workers` compute threads (several at once: see
        # ServerConfig.compute_workers); loading has its own thread.
        self.workers, self.torch_threads = compute_plan(config)
        self.compute = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="compute")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        # Access files are read before the bundle: a bad tokens/TLS/key file is a start-up error (AccessConfigError).
        self.tokens = load_tokens(config.tokens) if config.tokens is not None else None
        self.credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                            if config.tls_cert is not None else None)
        self.pseudonymise = Pseudonymiser.from_file(config.user_id_key) if config.user_id_key is not None else None
        self.holder = RuntimeHolder(config, self.device, self.dtype, self.compute, self.loader, self.workers)
        self.replica = Replica(self.holder, self.holder.store, "") if self.holder.store is not None else None
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics = Metrics(self.holder) if config.metrics_port is not None else None
        self.metrics_port: int | None = None

    async def start(self) -> int:
        started = time.monotonic()
        cpu = self.holder.cpu
        log.info("device %s, encoder %s/%s; %d compute thread(s), %d torch thread(s); CPU %s, native bf16 %s (%s), flags %s",
                 self.device, self.config.backend, self.dtype, self.workers, self.torch_threads, cpu["cpu_model"] or "unknown",
                 "yes" if cpu["native_bf16"] else "no", cpu["native_bf16_source"], " ".join(cpu["cpu_flags"]) or "-")
        store = self.holder.store
        bundle = self.config.bundle
        if store is not None:
            await store.open()  # StoreError: refuse to start; loads the catalog changes the bundle must reflect
            active = getattr(store, "active", {})
            if active.get("path") and Path(active["path"]) != Path(bundle):
                # A replica joins at the version the fleet serves, whatever it was started with.
                log.info("the fleet serves %s (%s, rollout %s): loading it instead of %s", active.get("version"),
                         active["path"], active.get("rollout"), bundle)
                bundle = Path(active["path"])
        if self.config.page_token_key is not None:
            self.holder.page_tokens = PageTokens(self.config.page_token_key.read_bytes())
        elif store is not None:  # every replica signs and checks page tokens with the same key
            self.holder.page_tokens = PageTokens(await store.secret("page_token"))
        if store is not None and self.holder.ads is not None:  # every replica signs and checks auction ids alike
            self.holder.ads.tokens = AuctionTokens(await store.secret("auction"))
        await self.holder.load_initial(bundle)  # BundleError: refuse to start (a replica that cannot load never joins)
        # Each compute thread encodes and searches with its share of the cores (two batches with every
        # core each oversubscribe them). Set after the first load: loading, tracing, training the
        # small-batch codes and the warm-up run alone and use every core.
        use_threads(self.torch_threads)
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        if self.config.max_connection_age_s > 0:
            # Long-lived HTTP/2 connections pin a client to one replica; closing them at an age (GOAWAY, then
            # a grace period for calls in flight) lets clients behind an L4 balancer spread over new replicas.
            opts += [("grpc.max_connection_age_ms", int(1000 * self.config.max_connection_age_s)),
                     ("grpc.max_connection_age_grace_ms", int(1000 * max(self.config.grace_s, 1.0)))]
        on_denied = self.metrics.observe_denied if self.metrics is not None else None
        # maximum_concurrent_rpcs bounds the calls held in memory under overload: beyond it gRPC answers
        # RESOURCE_EXHAUSTED before a handler (or a request buffer) exists.
        gatekeeper = Gatekeeper(self.tokens, on_denied)
        server = grpc.aio.server(options=opts, interceptors=[gatekeeper],
                                 maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        add_to_server(SearchRecommendService(self.holder, started, self.metrics, self.pseudonymise, self.replica,
                                             gatekeeper), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        port = (server.add_secure_port(address, self.credentials) if self.credentials is not None
                else server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await server.start()
        if self.replica is not None:
            self.replica.address = f"{self.config.host}:{port}"
            # Every change recorded before now is applied before SERVING; then the replica follows the store.
            await self.replica.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.grpc_server, self.port = server, port
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        # Both figures: the bundle/encoder part this object controls, and the whole start (imports
        # included: ~6 s of torch and transformers here), which is what a caller waits for.
        log.info("serving %s on %s:%d (%s%s, %.1fs to SERVING, %.1fs since start)", self.holder.current.version,
                 self.config.host, port,
                 "plaintext" if self.credentials is None else "mutual TLS" if self.config.tls_client_ca else "TLS",
                 ", tokens" if self.tokens is not None else "", time.monotonic() - started,
                 time.time() - IMPORTED_AT)
        return port

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()  # NOT_SERVING first, so balancers move away
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        if self.replica is not None:
            await self.replica.stop()
        await self.holder.close()
        if self.metrics is not None:
            self.metrics.close()
        self.compute.shutdown(wait=True)
        self.loader.shutdown(wait=True)

    async def reload(self, path: Path | None):
        """ReloadBundle / SIGHUP: this process, or the whole fleet when the state is shared."""
        if self.replica is not None:
            return await self.replica.reload(path)
        return await self.holder.reload(path)

    async def wait_for_termination(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.wait_for_termination()


async def create_server(config: ServerConfig) -> tuple[SearchrecServer, int]:
    """Build and start a server on the running loop; returns it and the bound port."""
    server = SearchrecServer(config)
    try:
        port = await server.start()
    except BaseException:
        server.compute.shutdown(wait=False)
        server.loader.shutdown(wait=False)
        raise
    return server, port
