"""Reliability scenarios driven against a real `python -m server` process over loopback gRPC.

Each returns plain counts; the tests assert on them at a small scale (tests/test_reliability.py,
tests/test_crash.py) and `bench/reliability.py` prints them at a larger one:

- `overload`: a baseline closed loop, then a flood of many concurrent callers (each call with a
  deadline), then the baseline again: what was admitted, rejected and how fast, the server's peak
  resident memory, and the throughput after the flood.
- `swap_under_load`: Search / Recommend / SimilarItems from several threads while bundles are swapped
  by ReloadBundle and by re-pointing a symlink + SIGHUP; every answer is checked against the bundle
  it names (no answer may mix two bundles).
- `kill9`: Feedback and UpsertItems streamed at a server that is then SIGKILLed; what was acknowledged
  is compared with what the event log holds after.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
import pandas as pd
import psutil

from common import bundle_format as bf
from server.stubs import pb, pb_grpc

QUERIES = ["cordless drill", "garden hose", "led light bulb", "kitchen faucet", "paint roller", "ceiling fan",
           "door lock", "circular saw", "area rug", "blender", "air filter", "toilet seat"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- overload --------------------------------------------------------------------------------

async def _closed_loop(target: str, seconds: float, concurrency: int, deadline_s: float) -> list[tuple[str, float]]:
    """`concurrency` callers, each sending Search after Search for `seconds`: [(code name, latency s)]."""
    out: list[tuple[str, float]] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.SearchRecommendStub(ch)
        stop_at = time.monotonic() + seconds

        async def caller(i: int) -> None:
            n = i
            while time.monotonic() < stop_at:
                n += 1
                t0 = time.perf_counter()
                try:
                    await stub.Search(pb.SearchRequest(query=QUERIES[n % len(QUERIES)], k=10), timeout=deadline_s)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                out.append((code, time.perf_counter() - t0))

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return out


def _summary(calls: list[tuple[str, float]], seconds: float) -> dict:
    codes: dict[str, int] = {}
    for code, _ in calls:
        codes[code] = codes.get(code, 0) + 1
    ok = [lat for code, lat in calls if code == "OK"]
    rejected = [lat for code, lat in calls if code == "RESOURCE_EXHAUSTED"]
    # Refused by a server (RESOURCE_EXHAUSTED) or by a proxy with no free replica (UNAVAILABLE).
    refused = [lat for code, lat in calls if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")]
    return {"sent": len(calls), "sent_per_s": len(calls) / seconds, "ok_per_s": len(ok) / seconds, "codes": codes,
            "ok_p50_ms": 1000 * _pct(ok, 0.5), "ok_p99_ms": 1000 * _pct(ok, 0.99),
            "rejected_p50_ms": 1000 * _pct(rejected, 0.5), "rejected_p99_ms": 1000 * _pct(rejected, 0.99),
            "refused_p50_ms": 1000 * _pct(refused, 0.5), "refused_p99_ms": 1000 * _pct(refused, 0.99)}


def _probe(target: str, seconds: float, concurrency: int, deadline_s: float) -> dict:
    """A well-behaved client in its own process: `concurrency` threads, one Search after another."""
    calls: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def caller(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            n = i
            while time.monotonic() < stop_at:
                n += 1
                t0 = time.perf_counter()
                try:
                    stub.Search(pb.SearchRequest(query=QUERIES[n % len(QUERIES)], k=10), timeout=deadline_s)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                latency = time.perf_counter() - t0  # the call's own latency (before any backoff)
                with lock:
                    calls.append((code, latency))
                if code != "OK":
                    time.sleep(0.05)  # a well-behaved client backs off when refused

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(calls, seconds)


def overload(target: str, pid: int, *, base_s: float = 3.0, flood_s: float = 6.0, base_concurrency: int = 8,
             flood_concurrency: int = 400, deadline_s: float = 1.0, probe_concurrency: int = 4) -> dict:
    """Baseline, flood, baseline again (see module docstring). pid: the server process, for its memory.

    During the flood a separate probe process (a few well-behaved callers that back off when refused)
    measures what an ordinary client sees: the flood generator itself saturates its own event loop, so
    the latencies it records include its own lag."""
    import subprocess
    import sys
    proc = psutil.Process(pid)
    rss = [proc.memory_info().rss]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            rss.append(proc.memory_info().rss)
            time.sleep(0.05)

    def server_counts() -> dict:
        with grpc.insecure_channel(target) as ch:
            b = pb_grpc.SearchRecommendStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).batcher
        return {"computed": b.requests_done, "rejected_by_batcher": b.requests_rejected,
                "expired_before_compute": b.requests_expired, "cancelled_by_caller": b.requests_cancelled}

    before = _summary(asyncio.run(_closed_loop(target, base_s, base_concurrency, deadline_s)), base_s)
    rss_before = proc.memory_info().rss
    counts_before = server_counts()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")])))
    probe = subprocess.Popen([sys.executable, "-m", "loadtest.scenarios", "probe", target, str(max(flood_s - 2.0, 1.0)),
                              str(probe_concurrency), str(deadline_s)], cwd=root, env=env, stdout=subprocess.PIPE,
                             text=True)  # ~1-2 s to import, so it runs inside the flood
    try:
        flood = _summary(asyncio.run(_closed_loop(target, flood_s, flood_concurrency, deadline_s)), flood_s)
        probed = json.loads(probe.communicate(timeout=60)[0])
    finally:
        sampling.set()
        sampler.join()
        if probe.poll() is None:
            probe.kill()
    counts_after = server_counts()
    after = _summary(asyncio.run(_closed_loop(target, base_s, base_concurrency, deadline_s)), base_s)
    return {
        # What the server itself saw during the flood (search batcher); refusals by the concurrency
        # limit happen in gRPC's C core and are not counted here.
        "flood_server": {k: counts_after[k] - counts_before[k] for k in counts_after},
        "deadline_ms": 1000 * deadline_s, "flood_concurrency": flood_concurrency,
        "before": before, "flood": flood, "probe_during_flood": probed, "after": after,
        "offered_over_sustainable": flood["sent_per_s"] / max(before["ok_per_s"], 1e-9),
        "recovered_over_before": after["ok_per_s"] / max(before["ok_per_s"], 1e-9),
        "rss_before_mb": rss_before / 2 ** 20, "rss_peak_mb": max(rss) / 2 ** 20,
    }


# --- hot swap under load ---------------------------------------------------------------------

def marked_copy(src: Path, dst: Path, marker: str) -> Path:
    """A valid copy of bundle src whose every title starts with marker and whose version is
    marker-prefixed (re-checksummed), so an answer computed on it is recognisable item by item."""
    shutil.copytree(src, dst)
    items_file = dst / "items.parquet"
    df = pd.read_parquet(items_file)
    df["title"] = marker + " " + df["title"].astype(str)
    df.to_parquet(items_file, index=False)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["bundle_version"] = f"{marker}-{manifest['bundle_version']}"
    manifest["files"] = bf.checksum_tree(dst)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst


def titles_by_version(bundles: list[Path]) -> dict[str, dict[str, str]]:
    """version -> {item_id: title} of each bundle, to check answers against."""
    out = {}
    for b in bundles:
        manifest = json.loads((b / "manifest.json").read_text())
        df = pd.read_parquet(b / "items.parquet", columns=["item_id", "title"])
        out[manifest["bundle_version"]] = dict(zip(df["item_id"], df["title"]))
    return out


def swap_under_load(target: str, pid: int, bundles: list[Path], *, swaps: int = 6, link: Path | None = None,
                    threads: int = 6, settle_s: float = 0.5) -> dict:
    """Swap between `bundles` `swaps` times under load. With `link` (the symlink the server was started
    with) every swap re-points it, odd swaps then send SIGHUP and even ones ReloadBundle(link); without
    it every swap is ReloadBundle(path)."""
    known = titles_by_version(bundles)
    versions = list(known)
    item_ids = sorted(set.intersection(*(set(t) for t in known.values())))[:500]
    has_rec = all((b / bf.REC_MODEL_FILE).is_file() for b in bundles)
    stats = {"requests": 0, "failed": 0, "mixed": 0, "unknown_version": 0}
    failures: list[str] = []
    seen: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def check(version: str, items) -> bool:
        titles = known.get(version)
        if titles is None:
            stats["unknown_version"] += 1
            return False
        return all(titles.get(it.item_id) == it.title for it in items)

    def worker(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            n = i
            while not stop.is_set():
                n += 1
                try:
                    if n % 10 < 7:
                        r = stub.Search(pb.SearchRequest(query=QUERIES[n % len(QUERIES)], k=10), timeout=10)
                    elif n % 10 < 9 and has_rec:  # known users of the sample, unknown ones elsewhere (cold start)
                        r = stub.Recommend(pb.RecommendRequest(user_id=f"U{n % 400 + 1:04d}", k=10), timeout=10)
                    else:
                        item = item_ids[n % len(item_ids)]
                        r = stub.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=10), timeout=10)
                    ok = check(r.bundle_version, r.items)
                    with lock:
                        stats["requests"] += 1
                        seen[r.bundle_version] = seen.get(r.bundle_version, 0) + 1
                        if not ok:
                            stats["mixed"] += 1
                except grpc.RpcError as err:
                    with lock:
                        stats["requests"] += 1
                        stats["failed"] += 1
                        failures.append(f"{err.code().name}: {err.details()}")

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    swap_s: list[float] = []
    methods: list[str] = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.SearchRecommendStub(ch)
        time.sleep(settle_s)
        for s in range(swaps):
            nxt = bundles[(s + 1) % len(bundles)]
            want = versions[(s + 1) % len(bundles)]
            t0 = time.perf_counter()
            if link is not None:
                tmp = link.with_name(link.name + ".new")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(nxt.resolve())
                os.replace(tmp, link)  # atomic re-point, as a deploy tool does
            if link is not None and s % 2 == 1:
                os.kill(pid, signal.SIGHUP)  # re-read the path the server was given
                while stub.GetInfo(pb.GetInfoRequest(), timeout=10).bundle_version != want:
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError(f"SIGHUP did not swap in {want}")
                    time.sleep(0.02)
                methods.append("SIGHUP")
            else:
                stub.ReloadBundle(pb.ReloadBundleRequest(path=str(link or nxt)), timeout=120)
                methods.append("ReloadBundle")
            swap_s.append(time.perf_counter() - t0)
            time.sleep(settle_s)
    stop.set()
    for t in pool:
        t.join(30)
    return {**stats, "swaps": swaps, "methods": methods, "swap_s_median": statistics.median(swap_s),
            "versions_seen": seen, "failures": failures[:5]}


# --- kill -9 ---------------------------------------------------------------------------------

def kill9(served, state_dir: Path, min_events: int = 200, timeout_s: float = 60.0) -> dict:
    """Stream Feedback (4 events per request) and an UpsertItems every 5th request at `served`, SIGKILL
    it after min_events acknowledged events, then read the state directory back."""
    from server.state import LiveState

    acked_events: list[str] = []
    acked_items: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 5 == 0:
                    item = f"LIVE-{n}"
                    served.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=item, title=f"Live item {n}")]),
                                            timeout=10)
                    acked_items.append(item)
                else:
                    evs = [pb.Event(event_id=f"r{n}-{j}", user_id=f"u{n % 7}", item_id=f"SR-{j + 1:05d}",
                                    type=pb.Event.VIEW) for j in range(4)]
                    served.stub.Feedback(pb.FeedbackRequest(events=evs), timeout=10)
                    acked_events.extend(e.event_id for e in evs)
            except grpc.RpcError:
                return  # the server is gone

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while len(acked_events) < min_events and time.monotonic() < deadline:
        time.sleep(0.05)
    served.proc.kill()  # SIGKILL: no shutdown path runs
    served.proc.wait(10)
    stop.set()
    worker.join(10)

    after = LiveState(state_dir)
    try:
        found = set(after.event_ids)
        by_request: dict[str, int] = {}
        for eid in found:
            req = eid.split("-")[0]
            by_request[req] = by_request.get(req, 0) + 1
        items_found = {i for i, v in after.items.items() if v is not None}
        return {"events_acked": len(acked_events), "events_found": len(found),
                "events_lost": len(set(acked_events) - found),
                "items_acked": len(acked_items), "items_lost": len(set(acked_items) - items_found),
                "half_applied_requests": sum(1 for v in by_request.values() if v != 4),
                "torn_bytes": after.replay_report.torn_bytes}
    finally:
        after.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


if __name__ == "__main__":  # `python -m loadtest.scenarios probe TARGET SECONDS CONCURRENCY DEADLINE_S`
    import sys

    if len(sys.argv) != 6 or sys.argv[1] != "probe":
        raise SystemExit("usage: python -m loadtest.scenarios probe TARGET SECONDS CONCURRENCY DEADLINE_S")
    print(json.dumps(_probe(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))))
