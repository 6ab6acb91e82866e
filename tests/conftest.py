"""Shared fixtures: the sample bundle (built once per session) and a real server on port 0.

The server runs on its own event loop in a background thread; tests talk to it with ordinary
synchronous gRPC channels, the way internal services do.

CPU kinds: whether this CPU has native bf16 decides the default encoder precision. Tests that depend
on it take the `cpu_kind` fixture, which runs them once as each kind (SEARCHREC_CPU_BF16=1 / 0), so both
paths run on any machine. `pytest --cpu-kind other` runs the whole suite as the kind this CPU is not
(`.ci/run` does that for the server tests); the header of every run says which kind it used.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "training" / "sample"
sys.path.insert(0, str(ROOT))

from loadtest.hostile import field_of  # noqa: E402,F401  (one helper for tests and the reliability report)


def pytest_addoption(parser):
    parser.addoption("--cpu-kind", choices=("detect", "bf16", "plain", "other"), default="detect",
                     help="treat the CPU as having native bf16 (bf16), as not (plain), as the kind it is not "
                          "(other), or as it is (detect: SEARCHREC_CPU_BF16 or /proc/cpuinfo)")


def pytest_configure(config):
    import tempfile

    from common.cpu import OVERRIDE_ENV, native_bf16_detected

    # Builds in tests track their runs (TensorBoard events) in a folder of their own, not in the checkout's runs/.
    os.environ.setdefault("SEARCHREC_RUNS", tempfile.mkdtemp(prefix="searchrec-runs-"))

    kind = config.getoption("--cpu-kind")
    if kind == "other":
        kind = "plain" if native_bf16_detected() else "bf16"
    if kind in ("bf16", "plain"):
        # Set before any server, build or subprocess starts: all of them read it (common.cpu).
        os.environ[OVERRIDE_ENV] = "1" if kind == "bf16" else "0"


def pytest_report_header(config):
    from common.cpu import cpu_kind

    k = cpu_kind()
    return (f"cpu: {k['cpu_model'] or 'unknown'}, {k['cores']} cores; native bf16: {'yes' if k['native_bf16'] else 'no'} "
            f"({k['native_bf16_source']}); flags: {' '.join(k['cpu_flags']) or '-'}")


@pytest.fixture(params=["bf16", "plain"])
def cpu_kind(request, monkeypatch) -> str:
    """Run the test as a CPU with native bf16 and as one without; yields the CPU default precision
    (`bfloat16` / `float32`) that the kind must get. Processes the test starts inherit the kind."""
    from common.cpu import OVERRIDE_ENV

    monkeypatch.setenv(OVERRIDE_ENV, "1" if request.param == "bf16" else "0")
    return "bfloat16" if request.param == "bf16" else "float32"


def data_dir() -> Path:
    """The shared real-data directory (SEARCHREC_DATA_DIR, default ../shared/data)."""
    return Path(os.environ.get("SEARCHREC_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory) -> Path:
    """Servers the tests start as processes keep their encoder graphs here, not in ~/.cache."""
    path = tmp_path_factory.mktemp("encoder-cache")
    os.environ["SEARCHREC_ENCODER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def sample_bundle(tmp_path_factory) -> Path:
    from training.__main__ import main as training_main

    out = tmp_path_factory.mktemp("bundles") / "sample"
    # Bounded by epochs (early stopping ends it near 50 here, in ~8 s), not by the clock: the generous time
    # cap only guards against a hang, so a slower machine trains the same model.
    assert training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--interactions",
                          str(SAMPLE / "interactions.csv"), "--query-log", str(SAMPLE / "judgments.csv"),
                          "--out", str(out), "--name", "sample", "--device", "cpu", "--rec-minutes", "20", "--rec-epochs", "60"]) == 0
    return out


@pytest.fixture(scope="session")
def second_bundle(sample_bundle, tmp_path_factory) -> Path:
    """A second valid bundle with its own version: the sample bundle, re-versioned and re-checksummed."""
    out = tmp_path_factory.mktemp("bundles") / "second"
    shutil.copytree(sample_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bundle_version"] = "second-" + manifest["bundle_version"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


LOCOMOTIVE = "Acme steam locomotive deluxe"  # titles the synthetic classifier of clf_bundle knows
HOSE = "Bolt garden hose pro"


@pytest.fixture(scope="session")
def clf_bundle(tmp_path_factory) -> Path:
    """The sample catalog (minimal build) with a classifier trained for one epoch on the synthetic hierarchical
    catalog of test_classify.py; its dev split is too small to vouch for auto-fill (threshold 1.0)."""
    from tests.test_classify import synthetic_csv
    from training.__main__ import main as training_main

    folder = tmp_path_factory.mktemp("classify-serving")
    data = synthetic_csv(folder / "shop.csv")
    out = folder / "bundle"
    assert training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--out", str(out), "--name", "clf",
                          "--device", "cpu", "--dtype", "float32", "--classifier-data", str(data),
                          "--classifier-epochs", "1", "--classifier-minutes", "3"]) == 0
    return out


class ServerThread:
    """A searchrec server on port 0, run on an event loop in a daemon thread."""

    def __init__(self, config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.port = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from server.app import create_server

        asyncio.set_event_loop(self.loop)

        async def boot():
            self.server, self.port = await create_server(self.config)

        try:
            self.loop.run_until_complete(boot())
        except BaseException as exc:  # surfaced to the test in start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "ServerThread":
        self.thread.start()
        self._ready.wait(300)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return  # stopped already (a test may stop a server its fixture stops again)
        if self.server is not None:
            self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def make_config(bundle: Path, **overrides):
    from server.config import ServerConfig

    return ServerConfig(bundle=bundle, port=0, device="cpu", **overrides)


def serve(bundle: Path, **overrides):
    """Run a server on bundle for the duration of a fixture."""
    srv = ServerThread(make_config(bundle, **overrides)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(sample_bundle):
    yield from serve(sample_bundle)


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from server.stubs import pb_grpc

    return pb_grpc.SearchRecommendStub(channel)


@pytest.fixture(scope="session")
def pb():
    from server.stubs import pb as _pb

    return _pb


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError that fn(*args, **kwargs) raises (the test fails if it raises none)."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value

