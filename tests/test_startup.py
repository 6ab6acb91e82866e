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


def _serve_once(sample_bundle, *args) -> tuple[str, list[str]]:
    """Start `python -m server`, ask one Search, stop it; return its log and the result ids."""
    import re
    import signal

    import grpc

    from server.stubs import pb, pb_grpc

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--bundle", str(sample_bundle), "--port", "0",
                             "--device", "cpu", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        port = None
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"searchrec serving \S+ on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "server never reported SERVING:\n" + "".join(log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = pb_grpc.SearchRecommendStub(ch).Search(pb.SearchRequest(query="cordless drill", k=5), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(log), [it.item_id for it in resp.items]


def test_a_restart_loads_the_onnx_encoder_the_first_start_exported(sample_bundle, tmp_path):
    # The CPU default on every kind: ONNX Runtime int8, exported and quantized on the first start,
    # loaded from the cache (and checked against its probe vectors) on the next.
    cache = tmp_path / "graphs"
    first_log, first = _serve_once(sample_bundle, "--encoder-cache", str(cache))
    assert "device cpu, encoder onnx/int8;" in first_log
    assert "encoder_cache = " + str(cache) in first_log and "encoder exported to ONNX (int8) and cached" in first_log
    again_log, again = _serve_once(sample_bundle, "--encoder-cache", str(cache))
    assert "encoder ONNX graph (int8) loaded from cache" in again_log and "exported" not in again_log
    assert again == first and len(first) == 5 and len(list(cache.glob("encoder-*.onnx"))) == 1


def test_a_restart_loads_the_torch_graph_the_first_start_cached(sample_bundle, tmp_path, cpu_kind):
    # --backend torch, run as each CPU kind (cpu_kind sets SEARCHREC_CPU_BF16 for the server processes):
    # the default precision is that kind's, and either precision is traced, cached and loaded again.
    cache = tmp_path / "graphs"
    first_log, first = _serve_once(sample_bundle, "--encoder-cache", str(cache), "--backend", "torch")
    assert f"device cpu, encoder torch/{cpu_kind};" in first_log
    assert "encoder_cache = " + str(cache) in first_log and "encoder graph traced and cached" in first_log
    again_log, again = _serve_once(sample_bundle, "--encoder-cache", str(cache), "--backend", "torch")
    assert "encoder graph loaded from cache" in again_log and f"device cpu, encoder torch/{cpu_kind};" in again_log
    assert again == first and len(first) == 5


def test_a_graph_is_cached_per_precision(sample_bundle, tmp_path):
    # Each precision asked for explicitly: a graph of one is never served for the other (float32 and
    # int8 run in ONNX Runtime under --backend auto, bfloat16 in torch).
    cache = tmp_path / "graphs"
    for dtype, engine, cached in (("float32", "onnx", "encoder exported to ONNX (float32) and cached"),
                                  ("int8", "onnx", "encoder exported to ONNX (int8) and cached"),
                                  ("bfloat16", "torch", "encoder graph traced and cached")):
        log, ids = _serve_once(sample_bundle, "--encoder-cache", str(cache), "--dtype", dtype)
        assert f"encoder {engine}/{dtype};" in log and cached in log and len(ids) == 5
    assert len(list(cache.glob("encoder-*.onnx"))) == 2 and len(list(cache.glob("encoder-*.pt"))) == 1


def test_a_malformed_cpu_override_is_a_startup_error(sample_bundle, monkeypatch):
    monkeypatch.setenv("SEARCHREC_CPU_BF16", "maybe")
    proc = run_server("--bundle", str(sample_bundle))
    assert proc.returncode == 2 and "SEARCHREC_CPU_BF16 must be 1 or 0" in proc.stderr


def test_sigterm_shuts_down_gracefully(sample_bundle):
    # _serve_once asks one Search, sends SIGTERM and requires exit status 0. No cache: exported, not kept.
    log, ids = _serve_once(sample_bundle, "--encoder-cache", "none")
    assert "encoder_cache = None" in log and "and cached" not in log and "from cache" not in log and len(ids) == 5


def test_encoder_cache_flag_defaults():
    from server.config import default_cache_dir, from_args

    env = {k: os.environ.pop(k) for k in ("SEARCHREC_ENCODER_CACHE", "XDG_CACHE_HOME") if k in os.environ}
    try:
        assert str(from_args(["--bundle", "b"]).encoder_cache) == default_cache_dir()
        assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "searchrec")
        os.environ["SEARCHREC_ENCODER_CACHE"] = "/srv/cache"
        assert str(from_args(["--bundle", "b"]).encoder_cache) == "/srv/cache"
        assert from_args(["--bundle", "b", "--encoder-cache", "none"]).encoder_cache is None
    finally:
        os.environ.pop("SEARCHREC_ENCODER_CACHE", None)
        os.environ.update(env)
