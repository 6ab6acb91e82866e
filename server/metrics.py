"""Prometheus metrics of one server (`--metrics-port`), in a registry of its own.

Observed as they happen: per-RPC latency histograms and status codes, and for every batch of every
batcher its size, its compute time and each request's queue time. Read at scrape time from the live
objects (so they can never drift): queue depth, rejected / expired / cancelled / failed counts, item
count, bundle version, device and dtype, recommender users, live users and event-log bytes.
"""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; `holder` (a RuntimeHolder) is read at scrape time."""

    def __init__(self, holder: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_latency = Histogram("searchrec_rpc_latency_seconds", "RPC latency (handler start to answer)",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rpc_total = Counter("searchrec_rpc", "RPCs answered, by method and status code", ["method", "code"],
                                 registry=r)
        self.batch_size = Histogram("searchrec_batch_size", "requests per computed batch", ["batcher"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("searchrec_queue_seconds", "time a request waited in a batcher queue",
                                    ["batcher"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram("searchrec_compute_seconds", "compute time of one batch", ["batcher"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.autofill = Counter("searchrec_category_autofill", "items upserted without a category: filled by the "
                                "classifier, or left empty (probability below the threshold)", ["result"],
                                registry=r)
        self.ads_served = Counter("searchrec_ads_served", "sponsored slots filled (ads returned)", registry=r)
        self.ad_clicks = Counter("searchrec_ad_clicks", "ad clicks reported, by whether they were charged",
                                 ["charged"], registry=r)
        self.ad_spend = Counter("searchrec_ad_spend", "money charged for ad clicks (currency units)", registry=r)
        self.denied = Counter("searchrec_denied", "calls refused by the access check, by method and code",
                              ["method", "code"], registry=r)
        self.holder = holder
        if holder is not None:
            r.register(_StateCollector(holder))
            for stats in (holder.stats, holder.rec_stats, holder.encode_stats, holder.classify_stats):
                stats.observer = self.observe_batch
        self.http = None

    def observe_rpc(self, method: str, seconds: float, code: str) -> None:
        self.rpc_latency.labels(method).observe(seconds)
        self.rpc_total.labels(method, code).inc()

    def observe_autofill(self, filled: int, below: int) -> None:
        if filled:
            self.autofill.labels("filled").inc(filled)
        if below:
            self.autofill.labels("below_threshold").inc(below)

    def observe_ads(self, served: int, _prices: float) -> None:
        if served:
            self.ads_served.inc(served)

    def observe_ad_clicks(self, charged: int, uncharged: int, spend: float) -> None:
        if charged:
            self.ad_clicks.labels("true").inc(charged)
            self.ad_spend.inc(spend)
        if uncharged:
            self.ad_clicks.labels("false").inc(uncharged)

    def observe_denied(self, method: str, code: str) -> None:
        self.denied.labels(method.rsplit("/", 1)[-1], code).inc()

    def observe_batch(self, batcher: str, size: int, compute_s: float, queue_s: list[float]) -> None:
        self.batch_size.labels(batcher).observe(size)
        self.compute_time.labels(batcher).observe(compute_s)
        q = self.queue_time.labels(batcher)
        for s in queue_s:
            q.observe(s)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        self.http, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self.http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None


class _StateCollector:
    """Gauges and counters read from the live server objects at scrape time."""

    def __init__(self, holder: Any) -> None:
        self.holder = holder

    def collect(self):
        h = self.holder
        runtime = h._current
        if runtime is None:
            return
        depth = GaugeMetricFamily("searchrec_queue_depth", "requests waiting in a batcher queue", labels=["batcher"])
        counts = {k: CounterMetricFamily(f"searchrec_requests_{k}", f"requests {k} by the batchers", labels=["batcher"])
                  for k in ("rejected", "expired", "cancelled", "failed", "done")}
        flight = GaugeMetricFamily("searchrec_batches_in_flight", "batches being computed now", labels=["batcher"])
        for b in runtime.batchers():
            kind = b.name.split("[", 1)[0]
            depth.add_metric([kind], b.queue_depth)
            flight.add_metric([kind], b.in_flight)
        for kind, stats in (("search", h.stats), ("recommend", h.rec_stats), ("encode", h.encode_stats),
                            ("classify", h.classify_stats)):
            for k, fam in counts.items():
                fam.add_metric([kind], getattr(stats, k))
        yield depth
        yield flight
        yield GaugeMetricFamily("searchrec_compute_threads", "threads that compute batches (batches run at once)",
                                value=h.workers)
        yield from counts.values()
        bundle = runtime.bundle
        alive = len(bundle.items.id_to_row)
        yield GaugeMetricFamily("searchrec_items", "items being served (live deletions excluded)", value=alive)
        info = InfoMetricFamily("searchrec_bundle", "the bundle being served and where")
        info.add_metric([], {"version": bundle.version, "device": h.device, "dtype": h.dtype,
                             "backend": runtime.encoder.backend,
                             "native_bf16": str(h.cpu["native_bf16"]).lower(),
                             "index_type": bundle.index_type, "recommender": str(bundle.rec is not None).lower(),
                             "classifier": str(runtime.classifier is not None).lower()})
        yield info
        yield GaugeMetricFamily("searchrec_event_loop_lag_seconds",
                                "how late the event loop runs timers (moving average; admission counts it)",
                                value=h.lag.seconds)
        live = h.live
        yield GaugeMetricFamily("searchrec_live_users", "users with live events", value=len(live.users) if live else 0)
        if live is not None:
            serving = sum(1 for c in live.campaigns.values() if h.ads is not None and h.ads.state(c) == "serving")
            yield GaugeMetricFamily("searchrec_ad_campaigns_serving", "campaigns that may serve now (status, dates, "
                                    "budgets, pacing)", value=serving)
        store = h.store
        state = store.info() if store is not None else {"backend": "none", "up": False, "log_bytes": 0}
        yield GaugeMetricFamily("searchrec_event_log_bytes", "size of the durable event log", value=state["log_bytes"])
        up = GaugeMetricFamily("searchrec_state_up", "1 while the state store is reachable; 0: reads answer from "
                               "this replica's last known state and writes are refused", labels=["backend"])
        up.add_metric([state["backend"]], 1.0 if state["up"] else 0.0)
        yield up
        if store is not None:
            yield CounterMetricFamily("searchrec_state_stale_reads", "reads answered from the local view because "
                                      "the store was unreachable", value=store.stale_reads)
            yield CounterMetricFamily("searchrec_state_write_failures", "writes refused (UNAVAILABLE) because the "
                                      "store was unreachable", value=store.write_failures)
