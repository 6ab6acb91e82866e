"""The Prometheus endpoint (--metrics-port): RPC latency and codes, batch histograms, live gauges."""
from __future__ import annotations

import re
import urllib.request

import grpc
import pytest

from tests.conftest import serve


@pytest.fixture(scope="module")
def metered(sample_bundle, tmp_path_factory):
    yield from serve(sample_bundle, metrics_port=0, state_dir=tmp_path_factory.mktemp("state"))


def scrape(srv) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def value(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in the scrape")


def test_metrics_count_what_happened(metered):
    from server.stubs import pb, pb_grpc

    with grpc.insecure_channel(metered.target) as ch:
        stub = pb_grpc.SearchRecommendStub(ch)
        for q in ("drill", "hammer", "paint brush"):
            stub.Search(pb.SearchRequest(query=q, k=3), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Search(pb.SearchRequest(query=" "), timeout=30)
        stub.Recommend(pb.RecommendRequest(user_id="U0001", k=3), timeout=30)
        stub.Feedback(pb.FeedbackRequest(events=[pb.Event(event_id="m1", user_id="mu", item_id="SR-00001", type=1)]))
    text = scrape(metered)
    assert value(text, "searchrec_rpc_total", method="Search", code="OK") == 3
    assert value(text, "searchrec_rpc_total", method="Search", code="INVALID_ARGUMENT") == 1
    assert value(text, "searchrec_rpc_total", method="Recommend", code="OK") == 1
    assert value(text, "searchrec_rpc_latency_seconds_count", method="Search") == 4
    assert value(text, "searchrec_batch_size_count", batcher="search") >= 1
    assert value(text, "searchrec_queue_seconds_count", batcher="search") == 3
    assert value(text, "searchrec_compute_seconds_count", batcher="recommend") >= 1
    assert value(text, "searchrec_requests_done_total", batcher="search") >= 3
    assert value(text, "searchrec_queue_depth", batcher="search") == 0
    assert value(text, "searchrec_batches_in_flight", batcher="search") == 0
    assert value(text, "searchrec_compute_threads") == metered.server.workers >= 1
    assert value(text, "searchrec_items") == 324
    assert value(text, "searchrec_live_users") == 1 and value(text, "searchrec_event_log_bytes") > 0
    version = metered.server.holder.current.version
    assert value(text, "searchrec_bundle_info", version=version, device="cpu", recommender="true") == 1
