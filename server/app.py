"""Wire the gRPC server: device policy, bundle runtime, service, health, reflection, shutdown.

`create_server(config) -> (server, port)` starts a server on the running event loop; tests bind
port 0. Shutdown: health NOT_SERVING -> stop accepting -> in-flight calls finish within the grace
period -> the batcher drains -> executors stop.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.encoding import resolve_device, resolve_dtype
from server import IMPORTED_AT
from server.access import Gatekeeper, Pseudonymiser, load_tokens, server_credentials
from server.config import ServerConfig, compute_plan
from server.metrics import Metrics
from server.runtime import RuntimeHolder, use_threads
from server.service import SearchRecommendService, add_to_server
from server.stubs import SERVICE_NAME

log = logging.getLogger(__name__)


class SearchrecServer:
    """A running searchrec server: the grpc.aio server plus what it serves."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # Fails fast (DeviceError) when cuda is asked for and absent: never a silent fallback.
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(self.device, config.dtype)
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
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics = Metrics(self.holder) if config.metrics_port is not None else None
        self.metrics_port: int | None = None

    async def start(self) -> int:
        started = time.monotonic()
        cpu = self.holder.cpu
        log.info("device %s, dtype %s; %d compute thread(s), %d torch thread(s); CPU %s, native bf16 %s (%s), flags %s",
                 self.device, self.dtype, self.workers, self.torch_threads, cpu["cpu_model"] or "unknown",
                 "yes" if cpu["native_bf16"] else "no", cpu["native_bf16_source"], " ".join(cpu["cpu_flags"]) or "-")
        await self.holder.load_initial(self.config.bundle)  # BundleError: refuse to start
        # Each compute thread encodes and searches with its share of the cores (two batches with every
        # core each oversubscribe them). Set after the first load: loading, tracing, training the
        # small-batch codes and the warm-up run alone and use every core.
        use_threads(self.torch_threads)
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        on_denied = self.metrics.observe_denied if self.metrics is not None else None
        # maximum_concurrent_rpcs bounds the calls held in memory under overload: beyond it gRPC answers
        # RESOURCE_EXHAUSTED before a handler (or a request buffer) exists.
        server = grpc.aio.server(options=opts, interceptors=[Gatekeeper(self.tokens, on_denied)],
                                 maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        add_to_server(SearchRecommendService(self.holder, started, self.metrics, self.pseudonymise), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        port = (server.add_secure_port(address, self.credentials) if self.credentials is not None
                else server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await server.start()
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
        await self.holder.close()
        if self.metrics is not None:
            self.metrics.close()
        self.compute.shutdown(wait=True)
        self.loader.shutdown(wait=True)

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
