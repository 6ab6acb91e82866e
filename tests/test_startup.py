"""Process-level start-up: a broken bundle or an absent CUDA device is a clear start-up error (exit 2)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def run_server(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "server", "--port", "0", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_broken_bundle_exits_non_zero_with_a_message(sample_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sample_bundle, broken)
    (broken / "items.parquet").unlink()
    proc = run_server("--bundle", str(broken), "--device", "cpu")
    assert proc.returncode == 2
    assert "file items.parquet is missing" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_gpu_is_a_startup_error(sample_bundle):
    proc = run_server("--bundle", str(sample_bundle), "--device", "cuda")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr


def test_missing_bundle_flag_is_a_usage_error():
    env = {k: v for k, v in os.environ.items() if k != "SEARCHREC_BUNDLE"}
    proc = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--bundle is required" in proc.stderr


def test_sigterm_shuts_down_gracefully(sample_bundle):
    import re
    import signal

    import grpc

    from server.stubs import pb, pb_grpc

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--bundle", str(sample_bundle), "--port", "0",
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in proc.stdout:
            m = re.search(r"searchrec serving \S+ on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "server never reported SERVING"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = pb_grpc.SearchRecommendStub(ch).Search(pb.SearchRequest(query="drill", k=2), timeout=30)
            assert len(resp.items) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
