"""The Locust gRPC load test runs headless against a real server and reports every RPC of the mix."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, serve


@pytest.fixture(scope="module")
def target(sample_bundle, tmp_path_factory):
    yield from serve(sample_bundle, state_dir=tmp_path_factory.mktemp("state"))


def test_locust_headless_mix(target, sample_bundle, tmp_path):
    env = dict(os.environ, SEARCHREC_BUNDLE=str(sample_bundle), SEARCHREC_DATA_DIR=str(tmp_path / "no-data"),
               PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", "8",
         "-r", "8", "-t", "6s", "--host", target.target, "--csv", str(tmp_path / "load"), "--only-summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "load_stats.csv"))}
    for method in ("Search", "Suggest", "Recommend", "SimilarItems", "Feedback"):
        assert int(rows[method]["Request Count"]) > 0, f"no {method} calls"
        assert int(rows[method]["Failure Count"]) == 0, f"{method} failed: {rows[method]}"
    assert int(rows["Search"]["Request Count"]) > int(rows["Feedback"]["Request Count"])
    assert int(rows["Suggest"]["Request Count"]) > int(rows["Search"]["Request Count"])  # several per Search
    assert "load generator CPU" in out.stdout + out.stderr


def test_locust_ads_heavy_mix(target, sample_bundle, tmp_path):
    """The ads mix: campaigns put at the start, sponsored slots checked (never organic too, priced within
    [reserve, bid], a click charged once), impressions and clicks reported, advertisers reading reports."""
    env = dict(os.environ, SEARCHREC_BUNDLE=str(sample_bundle), SEARCHREC_DATA_DIR=str(tmp_path / "no-data"),
               PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "ads_locustfile.py"), "--headless", "-u", "6",
         "-r", "6", "-t", "6s", "--host", target.target, "--csv", str(tmp_path / "load"), "--only-summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "load_stats.csv"))}
    for method in ("Search", "Feedback", "AdsReport", "ListCampaigns", "SimilarItems"):
        assert int(rows[method]["Request Count"]) > 0, f"no {method} calls"
    for name, row in rows.items():
        assert int(row["Failure Count"]) == 0, f"{name} failed: {row}"
    from server.stubs import pb, pb_grpc
    import grpc

    with grpc.insecure_channel(target.target) as ch:
        report = pb_grpc.SearchRecommendStub(ch).AdsReport(pb.AdsReportRequest(), timeout=30).rows
    assert sum(r.impressions for r in report) > 0 and sum(r.served for r in report) > 0


def test_locust_fleet_mode_through_the_proxy(sample_bundle, tmp_path):
    """Two replicas on a real Redis behind nginx: the fleet locustfile's checks (read-your-writes across
    replicas, sequence tokens) all hold, and both replicas answer."""
    from fleet.procs import Nginx, RedisServer
    from tests.conftest import ServerThread, make_config

    with RedisServer(tmp_path / "redis") as redis:
        reps = [ServerThread(make_config(sample_bundle, state=redis.url, replica_id=f"r{i}")).start() for i in range(2)]
        try:
            with Nginx(tmp_path / "nginx", [r.port for r in reps]) as proxy:
                env = dict(os.environ, SEARCHREC_BUNDLE=str(sample_bundle),
                           SEARCHREC_DATA_DIR=str(tmp_path / "no-data"), PYTHONPATH=str(ROOT))
                out = subprocess.run(
                    [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "fleet_locustfile.py"),
                     "--headless", "-u", "6", "-r", "6", "-t", "6s", "--host", proxy.target,
                     "--csv", str(tmp_path / "load"), "--only-summary"],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        finally:
            for r in reps:
                r.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "load_stats.csv"))}
    assert int(rows["Feedback"]["Request Count"]) > 0 and int(rows["Recommend"]["Request Count"]) > 0
    for name, row in rows.items():
        assert int(row["Failure Count"]) == 0, f"{name} failed: {row}"
    assert "read-your-writes" not in rows and "sequence-token" not in rows  # no check ever failed
    assert "GetInfo answered by: r0" in out.stdout + out.stderr and "r1" in out.stdout + out.stderr
