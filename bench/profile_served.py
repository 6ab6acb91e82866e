"""Where the time of the served path goes: a real server (in this process, on port 0) under closed-loop
gRPC clients in another process, with cProfile on its event-loop thread and on its compute thread.

    python bench/profile_served.py [--bundle DIR] [--clients 8] [--seconds 12] [--out PROFILE.txt]

Prints the clients' throughput and latency, then each thread's functions by own time. The event loop
shows the gRPC/Python overhead (its idle time is `epoll.poll`); the compute thread shows batching,
encoding, retrieval and ranking (its idle time is `SimpleQueue.get`).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

from benchutil import ROOT, bench_bundle
from serving_load import closed_loop, queries


def load(target: str, bundle: Path, clients: int, seconds: float) -> dict:
    """Closed-loop Search clients, the serving benchmark's (run in a separate process by main)."""
    import grpc

    from server.stubs import pb, pb_grpc

    with grpc.insecure_channel(target) as ch:
        return closed_loop(pb_grpc.SearchRecommendStub(ch), pb, queries(bundle, 2000), clients, seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)  # internal: run the clients against TARGET
    args = p.parse_args()
    bundle = (args.bundle or bench_bundle()).resolve()
    if args.load:
        print(json.dumps(load(args.load, bundle, args.clients, args.seconds)))
        return
    sys.path.insert(0, str(ROOT))
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(bundle)).start()
    cmd = [sys.executable, __file__, "--bundle", str(bundle), "--clients", str(args.clients), "--load", srv.target]
    subprocess.run(cmd + ["--seconds", "3"], capture_output=True, check=True)  # warm-up
    loop_prof, compute_prof = cProfile.Profile(), cProfile.Profile()
    stats = srv.server.holder.stats
    items0, batches0 = stats.items_computed, stats.batches_run
    srv.loop.call_soon_threadsafe(loop_prof.enable)
    srv.server.compute.submit(compute_prof.enable).result()
    out = subprocess.run(cmd + ["--seconds", str(args.seconds)], capture_output=True, text=True, check=True)
    srv.loop.call_soon_threadsafe(loop_prof.disable)
    srv.server.compute.submit(compute_prof.disable).result()
    time.sleep(0.2)
    mean_batch = (stats.items_computed - items0) / max(stats.batches_run - batches0, 1)
    srv.stop()
    text = f"bundle {bundle.name}: {out.stdout.strip()} (profilers on; mean batch {mean_batch:.1f})\n"
    for name, prof in (("event-loop thread", loop_prof), ("compute thread", compute_prof)):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        text += f"\n===== {name}\n{buf.getvalue()}"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
