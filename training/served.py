"""Run a bundle in a real `python -m server` process and query it over gRPC.

Evaluation goes through this so that what it measures is exactly what the server serves: the same
bundle loading, batcher, encoder, retrieval and kernels, with no re-implementation in training.
"""
from __future__ import annotations

import os
import re
import collections
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

try:
    from searchrec.v1 import searchrec_pb2 as pb
    from searchrec.v1 import searchrec_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover
    raise ImportError("generated gRPC stubs not found; run `bash scripts/gen_protos.sh`") from exc

ROOT = Path(__file__).resolve().parents[1]


class ServedBundle:
    """A server subprocess on a free loopback port; use as a context manager."""

    def __init__(self, bundle: Path, device: str = "auto", extra_args: tuple[str, ...] = ()) -> None:
        self.bundle = Path(bundle)
        self.args = [sys.executable, "-m", "server", "--bundle", str(self.bundle), "--port", "0",
                     "--device", device, *extra_args]
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub = None
        self.version = ""
        self.startup_s = 0.0
        self.port = 0
        self.output: collections.deque[str] = collections.deque(maxlen=500)

    def __enter__(self) -> "ServedBundle":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        lines = []
        port = None
        for line in self.proc.stdout:
            lines.append(line)
            m = re.search(r"searchrec serving (\S+) on [\d.]+:(\d+)", line)
            if m:
                self.version, port = m.group(1), int(m.group(2))
                break
        if port is None:
            self.proc.wait(30)
            raise RuntimeError("server failed to start:\n" + "".join(lines[-20:]))
        self.startup_s = time.perf_counter() - started
        self.port = port
        # Keep reading the server's output: a full pipe would block its logging and so the server.
        self.output: collections.deque[str] = collections.deque(lines, maxlen=500)
        threading.Thread(target=self._drain, daemon=True).start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.SearchRecommendStub(self.channel)
        return self

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def search(self, query: str, k: int, item_ids: list[str] | None = None, timeout: float = 60.0):
        req = pb.SearchRequest(query=query, k=k)
        if item_ids:
            req.filters.item_ids.extend(item_ids)
        return self.stub.Search(req, timeout=timeout)

    def info(self, timeout: float = 30.0):
        """The server's GetInfo (bundle, device, dtype, CPU flags)."""
        return self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout)

    def __exit__(self, *exc) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
