"""The fleet on one machine, measured: Redis, N replicas and nginx on loopback (all started here).

    python bench/fleet.py --json out/fleet.json [--bundle DIR] [--replicas N] [--seconds S]

In one run:
1. served Search q/s at p99 <= 50 ms through the proxy, for 1 replica and for N (a sweep of closed-loop clients);
2. a 10x overload through the proxy (late admitted calls, how fast refusals come back, the replicas' memory);
3. read-your-writes across replicas: Feedback on replica 0, then at once Recommend of the same user on replica 1,
   thousands of times back to back;
4. kill -9 of one replica under Feedback + Search through the proxy: calls failed, events acknowledged vs found
   in the store afterwards;
5. a graceful rolling restart of every replica under load (calls failed);
6. a fleet rollout (ReloadBundle to a recognisably different bundle) under load: calls failed, answers whose items
   do not all belong to the version they name.

Without --bundle it uses bundles/sample (built first if missing): the read-your-writes check needs a bundle
with a recommender (Search does not personalise; Recommend reads the user's events).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchutil  # puts the repository root first on sys.path: `fleet` below is the package, not this script
import grpc
import numpy as np
import psutil

from fleet.procs import Nginx, RedisServer, Replica
from loadtest.scenarios import QUERIES, marked_copy, titles_by_version
from loadtest.scenarios import _closed_loop as flood
from server.store.base import parse_token
from server.stubs import pb, pb_grpc

ROOT = benchutil.ROOT


def ensure_bundle() -> Path:
    """bundles/sample (built here if missing): it has a recommender, which the read-your-writes check reads."""
    out = ROOT / "bundles" / "sample"
    if not (out / "manifest.json").is_file():
        sample = ROOT / "training" / "sample"
        print(f"no bundle yet: building {out} from the sample catalog", flush=True)
        subprocess.run([sys.executable, "-m", "training", "build", "--catalog", str(sample / "catalog.jsonl"),
                        "--interactions", str(sample / "interactions.csv"), "--out", str(out), "--name", "sample",
                        "--device", "cpu", "--rec-minutes", "20", "--rec-epochs", "60"], cwd=ROOT, check=True)
    return out


def stub(target: str):
    return pb_grpc.SearchRecommendStub(grpc.insecure_channel(target))


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if len(values) else 0.0


# --- 1. throughput at a latency bound -----------------------------------------------------------

def closed_loop(target: str, clients: int, seconds: float) -> dict:
    local = threading.local()  # a channel per client thread, as separate callers would have

    def call(n: int) -> None:
        if not hasattr(local, "stub"):
            local.stub = stub(target)
        local.stub.Search(pb.SearchRequest(query=QUERIES[n], k=10), timeout=10)

    return benchutil.run_closed_loop(call, len(QUERIES), clients, seconds)


def sweep(target: str, levels: list[int], seconds: float) -> dict:
    closed_loop(target, 2, 1.0)  # connections up, caches warm
    rows = [closed_loop(target, c, seconds) for c in levels]
    within = [r for r in rows if r["p99_ms"] <= 50 and not r["errors"]]
    return {"rows": rows, "qps_p99_50ms": max((r["qps"] for r in within), default=0.0)}


# --- 2. overload --------------------------------------------------------------------------------

def overload(proxy: Nginx, replicas: list[Replica], sustainable_qps: float, seconds: float) -> dict:
    """A flood of 400 concurrent callers with 1 s deadlines (~10x what the fleet sustains). Late = admitted
    calls (not refused) that were not answered within their deadline.

    Refusal latency is read three ways: by the flood generator (which saturates its own event loop, so its
    figures include its own lag), by a probe process of 8 well-behaved callers during the flood (what an
    ordinary client sees: the headline), and by the proxy's own access log (time spent in nginx)."""
    target = proxy.target
    already = len(proxy.calls())
    procs = [psutil.Process(r.proc.pid) for r in replicas]
    rss = [sum(p.memory_info().rss for p in procs)]
    rss_before = rss[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss.append(sum(p.memory_info().rss for p in procs))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
    probe = subprocess.Popen([sys.executable, "-m", "loadtest.scenarios", "probe", target, str(max(seconds - 2.0, 1.0)),
                              "8", "1.0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    calls = asyncio.run(flood(target, seconds, 400, 1.0))  # the reliability scenarios' own flood
    probed = json.loads(probe.communicate(timeout=120)[0])
    done.set()
    sampler.join()
    at_proxy = proxy.calls()[already:]
    proxy_refused = [secs for status, secs, _, _ in at_proxy if status == 204]
    codes: dict[str, int] = {}
    for c, _ in calls:
        codes[c] = codes.get(c, 0) + 1
    refused = [t for c, t in calls if c in ("UNAVAILABLE", "RESOURCE_EXHAUSTED")]
    admitted = [(c, t) for c, t in calls if c not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED")]
    late = [1 for c, t in admitted if c == "DEADLINE_EXCEEDED" or t > 1.0]
    ok = [t for c, t in calls if c == "OK"]
    offered = len(calls) / seconds
    return {"offered_per_s": offered, "offered_over_sustainable": offered / max(sustainable_qps, 1e-9),
            "codes": codes, "admitted": len(admitted), "late": len(late),
            "late_pct": 100.0 * len(late) / max(len(admitted), 1), "ok_per_s": len(ok) / seconds,
            "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99),
            "flood_reject_p50_ms": pct(refused, 50), "flood_reject_p99_ms": pct(refused, 99),
            "probe": probed, "reject_p50_ms": probed["refused_p50_ms"], "reject_p99_ms": probed["refused_p99_ms"],
            "proxy_refused": len(proxy_refused), "proxy_reject_p99_ms": pct(proxy_refused, 99),
            "proxy_calls": len(at_proxy), "rss_before_mb": rss_before / 2**20, "rss_peak_mb": max(rss) / 2**20}


# --- 3. read-your-writes --------------------------------------------------------------------------

def read_your_writes(a: str, b: str, n: int) -> dict:
    sa, sb = stub(a), stub(b)
    violations = 0
    run = time.time_ns()
    t0 = time.perf_counter()
    for i in range(n):
        user = f"ryw-{run}-{i % 500}"
        sa.Feedback(pb.FeedbackRequest(events=[pb.Event(event_id=f"ryw-{run}-{i}", user_id=user, item_id=ITEM,
                                                         type=pb.Event.VIEW)]), timeout=10)
        if sb.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10).history_events != i // 500 + 1:
            violations += 1
    return {"pairs": n, "violations": violations, "pair_ms": 1000 * (time.perf_counter() - t0) / n}


def catalog_visibility(a: str, b: str, n: int) -> dict:
    """UpsertItems on replica a, then how long until replica b reports it applied (no token passed)."""
    sa, sb = stub(a), stub(b)
    waits = []
    for i in range(n):
        token = sa.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"VIS-{time.time_ns()}-{i}",
                                                                    title=f"Visibility probe lamp {i}")]),
                               timeout=10).sequence_token
        t0 = time.perf_counter()
        while parse_token(sb.GetInfo(pb.GetInfoRequest(), timeout=10).applied_token) < parse_token(token):
            if time.perf_counter() - t0 > 10:
                break
        waits.append(time.perf_counter() - t0)
    return {"changes": n, "visible_p50_ms": pct(waits, 50), "visible_p99_ms": pct(waits, 99),
            "visible_max_ms": 1000 * max(waits)}


# --- 4-6. faults under load ------------------------------------------------------------------------

class Load:
    """Search (and Feedback, 4 events a call with unique ids) through the proxy from a few threads, counting
    every failure; `acked` holds the event ids the fleet acknowledged; `check(resp)` may veto an answer."""

    def __init__(self, target: str, threads: int = 4, feedback: bool = True, check=None) -> None:
        self.target, self.feedback, self.check = target, feedback, check
        self.acked: list[str] = []
        self.calls = 0
        self.failed: dict[str, int] = {}
        self.vetoed = 0
        self.examples: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        s = stub(self.target)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                if self.feedback and n % 2 == 0:
                    ids = [f"load-{i}-{n}-{j}-{time.time_ns()}" for j in range(4)]
                    s.Feedback(pb.FeedbackRequest(events=[pb.Event(event_id=e, user_id=f"load-u{n % 50}", item_id=ITEM,
                                                                   type=pb.Event.CLICK) for e in ids]), timeout=10)
                    with self._lock:
                        self.acked += ids
                else:
                    resp = s.Search(pb.SearchRequest(query=QUERIES[n % len(QUERIES)], k=10), timeout=10)
                    with self._lock:
                        self.versions.add(resp.bundle_version)
                        if self.check is not None and not self.check(resp):
                            self.vetoed += 1
                with self._lock:
                    self.calls += 1
            except grpc.RpcError as err:
                with self._lock:
                    self.calls += 1
                    self.failed[err.code().name] = self.failed.get(err.code().name, 0) + 1
                    if len(self.examples) < 5:
                        self.examples.append(f"{err.code().name}: {err.details()}"[:300])

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(30)

    def summary(self) -> dict:
        return {"calls": self.calls, "failed": sum(self.failed.values()), "failed_by_code": dict(self.failed),
                "failure_examples": self.examples}


def stored_event_ids(redis: RedisServer, prefix: str = "searchrec") -> set[str]:
    import redis as redis_client

    r = redis_client.Redis(port=redis.port, decode_responses=True)
    found, last = set(), "-"
    while True:
        entries = r.xrange(f"{prefix}:events", min=last, count=5000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return found
        for _, f in entries:
            found.update(e["event_id"] for e in json.loads(f["events"]))
        last = entries[-1][0]


def proxy_failures(proxy: Nginx, since: int) -> dict[str, int]:
    """What the proxy answered other than 200 since call number `since`: "status upstreams-tried" -> count."""
    out: dict[str, int] = {}
    for status, _secs, upstream, _uri in proxy.calls()[since:]:
        if status != 200:
            key = f"{status} {upstream}"
            out[key] = out.get(key, 0) + 1
    return out


def kill_under_load(proxy: Nginx, victim: Replica, redis: RedisServer, seconds: float) -> dict:
    since = len(proxy.calls())
    with Load(proxy.target) as load:
        time.sleep(seconds / 2)
        victim.kill()  # SIGKILL: no drain, calls in flight on it are cut
        time.sleep(seconds / 2)
    found = stored_event_ids(redis)
    return {**load.summary(), "events_acked": len(load.acked), "events_lost": len(set(load.acked) - found),
            "at_proxy": proxy_failures(proxy, since)}


def rolling_restart(proxy: Nginx, replicas: list[Replica], settle_s: float) -> dict:
    since = len(proxy.calls())
    ports = [r.port for r in replicas]
    with Load(proxy.target) as load:
        for r in replicas:
            # As an operator does behind nginx (Kubernetes does it by removing the pod's endpoint): take the
            # replica out of the proxy, SIGTERM it (NOT_SERVING, in-flight calls finish), start it, wait until it
            # reports SERVING, put it back.
            proxy.set_upstreams([p for p in ports if p != r.port])
            r.stop()
            r.start(wait=True)
            proxy.set_upstreams(ports)
            time.sleep(settle_s)
    return {**load.summary(), "at_proxy": proxy_failures(proxy, since)}


def rollout(proxy: Nginx, target_bundle: Path, known: dict[str, dict[str, str]]) -> dict:
    def consistent(resp) -> bool:
        titles = known.get(resp.bundle_version)
        return titles is not None and all(titles.get(it.item_id) == it.title for it in resp.items
                                          if it.item_id in titles)

    with Load(proxy.target, feedback=False, check=consistent) as load:
        time.sleep(1.0)
        t0 = time.perf_counter()
        try:
            resp = stub(proxy.target).ReloadBundle(pb.ReloadBundleRequest(path=str(target_bundle)), timeout=600)
            error = ""
        except grpc.RpcError as err:
            resp, error = None, f"{err.code().name}: {err.details()}"
        seconds = time.perf_counter() - t0
        time.sleep(1.0)
    fleet = stub(proxy.target).GetInfo(pb.GetInfoRequest(), timeout=10).replicas
    return {**load.summary(), "error": error, "rollout_s": seconds, "versions_mixed_in_one_answer": load.vetoed,
            "versions_seen": sorted(load.versions), "new_version": resp.bundle_version if resp else "",
            "fleet_versions": sorted({r.bundle_version for r in fleet})}


ITEM = ""


def main() -> None:
    global ITEM
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "fleet.json")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="per load level and per fault scenario")
    ap.add_argument("--ryw", type=int, default=3000, help="read-your-writes pairs")
    args = ap.parse_args()
    bundle = args.bundle or ensure_bundle()
    import pandas as pd
    ITEM = str(pd.read_parquet(bundle / "items.parquet", columns=["item_id"])["item_id"].iloc[0])
    n = args.replicas
    levels = [1, 2, 4, 8, 16]
    res: dict = {"bundle": str(bundle), "replicas": n, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="searchrec-fleet-") as tmp:
        work = Path(tmp)
        with RedisServer(work / "redis") as redis:
            print(f"redis {redis.url}; one replica ...", flush=True)
            one = Replica(bundle, redis.url, work / "one", name="solo").start()
            with Nginx(work / "nginx1", [one.port]) as proxy:
                res["one"] = sweep(proxy.target, levels, args.seconds)
            one.stop()
            # N replicas share the cores: one compute thread and one torch thread each (2 cores, 2 replicas).
            per = ["--compute-workers", "1", "--torch-threads", str(max(1, psutil.cpu_count() // n))]
            print(f"{n} replicas ...", flush=True)
            reps = [Replica(bundle, redis.url, work / "n", name=f"r{i}", extra=per).start(wait=False) for i in range(n)]
            for r in reps:
                r.wait_serving()
            # max_conns: calls in flight per replica before the proxy refuses (~2 batches of queue each).
            with Nginx(work / "nginxN", [r.port for r in reps], max_conns=32, access_log=True) as proxy:
                res["n"] = sweep(proxy.target, levels, args.seconds)
                res["qps_1"], res["qps_n"] = res["one"]["qps_p99_50ms"], res["n"]["qps_p99_50ms"]
                print(f"q/s at p99<=50ms: 1 replica {res['qps_1']:.1f}, {n} replicas {res['qps_n']:.1f}", flush=True)
                # 10x the fleet's rate at p99 <= 50 ms (what the 400 callers manage to offer is recorded).
                res["overload"] = overload(proxy, reps, res["qps_n"], args.seconds)
                print(f"overload: {json.dumps(res['overload'])}", flush=True)
                res["read_your_writes"] = read_your_writes(reps[0].target, reps[1 % n].target, args.ryw)
                print(f"read-your-writes: {res['read_your_writes']}", flush=True)
                res["catalog_visibility"] = catalog_visibility(reps[0].target, reps[1 % n].target, 50)
                print(f"catalog visibility: {res['catalog_visibility']}", flush=True)
                res["kill"] = kill_under_load(proxy, reps[-1], redis, args.seconds)
                print(f"kill -9: {res['kill']}", flush=True)
                reps[-1].start(wait=True)
                time.sleep(2.0)  # the proxy tries the restarted replica again after fail_timeout (1 s)
                res["rolling_restart"] = rolling_restart(proxy, reps, 2.0)
                print(f"rolling restart: {res['rolling_restart']}", flush=True)
                marked = marked_copy(bundle, work / "marked", "ROLLOUT")
                res["rollout"] = rollout(proxy, marked, titles_by_version([bundle, marked]))
                print(f"rollout: {res['rollout']}", flush=True)
            for r in reps:
                r.stop()
    o = res["overload"]
    res.update({
        "overload_late_pct": o["late_pct"], "overload_reject_p99_ms": o["reject_p99_ms"],
        "kill_calls_failed": res["kill"]["failed"], "events_acked": res["kill"]["events_acked"],
        "events_lost": res["kill"]["events_lost"], "rolling_restart_failed": res["rolling_restart"]["failed"],
        "rollout_failed": res["rollout"]["failed"] + (1 if res["rollout"]["error"] else 0),
        "rollout_versions_mixed": res["rollout"]["versions_mixed_in_one_answer"],
        "cross_replica_read_your_writes_violations": res["read_your_writes"]["violations"],
        "qps_gain": res["qps_n"] / max(res["qps_1"], 1e-9),
        "catalog_visible_p99_ms": res["catalog_visibility"]["visible_p99_ms"],
    })
    keys = ["replicas", "qps_1", "qps_n", "qps_gain", "overload_late_pct", "overload_reject_p99_ms",
            "kill_calls_failed", "events_acked", "events_lost", "rolling_restart_failed", "rollout_failed",
            "rollout_versions_mixed", "cross_replica_read_your_writes_violations", "catalog_visible_p99_ms"]
    print(benchutil.table([{"key": k, "value": res[k]} for k in keys], ["key", "value"]))
    benchutil.write_json(args.json, res)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
