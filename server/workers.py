"""`python -m server ... --workers N`: N replica processes on one machine, on ports PORT..PORT+N-1.

One asyncio loop per process, so one slow batch or one flood of calls does not hold up the others, and every
core is used. The replicas share state through the store (`--state redis://...`; a local log belongs to one
process), and a proxy balances calls over them (deploy/nginx). This supervisor only starts them, forwards
signals (SIGTERM/SIGINT: every replica drains and stops; SIGHUP: one replica rolls the bundle out to the
fleet) and restarts a replica that dies; it holds no state and answers no calls.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from server.config import ServerConfig

log = logging.getLogger("server.workers")
RESTART_BACKOFF_S = 1.0


def child_args(argv: list[str], config: ServerConfig, i: int) -> list[str]:
    """The command line of replica i: the supervisor's own, with its port, name and metrics port."""
    name = f"{config.replica_id or 'worker'}-{i}"
    args = [sys.executable, "-m", "server", *argv, "--workers", "1", "--port", str(config.port + i),
            "--replica-id", name]
    if config.metrics_port:
        args += ["--metrics-port", str(config.metrics_port + i)]
    return args


def run_workers(config: ServerConfig, argv: list[str]) -> int:
    """Run config.workers replicas until SIGTERM/SIGINT; returns the exit status."""
    if not config.state:
        print("error: --workers N runs N replica processes that share state through the store: give "
              "--state redis://HOST:PORT/DB (a --state-dir log belongs to one process)", file=sys.stderr)
        return 2
    if config.port == 0:
        print("error: --workers N needs a fixed --port (replicas take PORT..PORT+N-1, the proxy's upstreams)",
              file=sys.stderr)
        return 2
    n = config.workers
    procs: list[subprocess.Popen | None] = [None] * n
    stopping = False

    def start(i: int) -> None:
        procs[i] = subprocess.Popen(child_args(argv, config, i))
        log.info("replica %d: pid %d on %s:%d", i, procs[i].pid, config.host, config.port + i)

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def hup(_signum, _frame) -> None:
        p = procs[0]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGHUP)  # one replica rolls the bundle out to the whole fleet

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)
    for i in range(n):
        start(i)
    print(f"searchrec supervising {n} replicas on {config.host}:{config.port}-{config.port + n - 1}", flush=True)
    status = 0
    while True:
        alive = 0
        for i, p in enumerate(procs):
            if p is None:
                continue
            code = p.poll()
            if code is None:
                alive += 1
            elif not stopping:
                if code == 2:  # the bundle, device, store or a file cannot be used: restarting cannot help
                    print(f"error: replica {i} cannot start (exit 2); stopping the others", file=sys.stderr)
                    status = 2
                    stop(signal.SIGTERM, None)
                else:
                    log.warning("replica %d exited with %s; restarting it in %.0f s", i, code, RESTART_BACKOFF_S)
                    time.sleep(RESTART_BACKOFF_S)
                    start(i)
                    alive += 1
        if stopping and not alive:
            return status
        time.sleep(0.2)
