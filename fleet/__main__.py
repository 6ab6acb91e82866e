"""`python -m fleet up --bundle DIR [--replicas N] [--port P] [--work DIR]`: a fleet on this machine.

Starts Debian's redis-server (AOF, fsync per write) in the work folder, N `python -m server` replicas on that
store and nginx in front of them on 127.0.0.1:P, waits until every replica reports SERVING, prints where
everything is, and runs until Ctrl-C / SIGTERM, then stops nginx, drains the replicas and stops Redis.
State survives a restart with the same --work folder.
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from fleet.procs import Nginx, RedisServer, Replica


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, N replicas and nginx; run until Ctrl-C")
    up.add_argument("--bundle", type=Path, required=True)
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--port", type=int, default=50050, help="the proxy's port (what callers use)")
    up.add_argument("--work", type=Path, default=None, help="folder for Redis's data, logs and configs (default: temporary)")
    up.add_argument("--max-conns", type=int, default=32, help="calls in flight per replica before the proxy refuses")
    args, server_args = ap.parse_known_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a bundle (no manifest.json)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="searchrec-fleet-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # With several replicas on one machine each takes its share of the cores (one compute thread each).
    extra = ["--compute-workers", "1"] if args.replicas > 1 else []
    with RedisServer(work / "redis") as redis:
        replicas = [Replica(args.bundle, redis.url, work / "replicas", name=f"replica-{i}", extra=extra + server_args)
                    .start(wait=False) for i in range(args.replicas)]
        try:
            for r in replicas:
                r.wait_serving()
            with Nginx(work / "nginx", [r.port for r in replicas], port=args.port, max_conns=args.max_conns) as proxy:
                print(f"fleet up: proxy {proxy.target} -> replicas {', '.join(r.target for r in replicas)}; "
                      f"state {redis.url}; logs in {work}", flush=True)
                stop.wait()
        finally:
            for r in replicas:
                r.stop()
    print("fleet stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
