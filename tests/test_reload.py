"""ReloadBundle: a good bundle swaps in atomically; a broken one is refused and the old keeps serving."""
from __future__ import annotations

import shutil
import threading

import grpc
import pytest

from tests.conftest import serve


@pytest.fixture(scope="module")
def reload_server(sample_bundle):
    # Its own server: reloads change what it serves, so the session server stays untouched.
    yield from serve(sample_bundle)


@pytest.fixture(scope="module")
def rstub(reload_server):
    from server.stubs import pb_grpc

    with grpc.insecure_channel(reload_server.target) as ch:
        yield pb_grpc.SearchRecommendStub(ch)


def test_reload_good_then_broken_bundle(rstub, pb, sample_bundle, second_bundle, tmp_path):
    first = rstub.GetInfo(pb.GetInfoRequest(), timeout=10).bundle_version

    resp = rstub.ReloadBundle(pb.ReloadBundleRequest(path=str(second_bundle)), timeout=120)
    assert resp.previous_version == first and resp.bundle_version.startswith("second-")
    assert rstub.Search(pb.SearchRequest(query="drill", k=3), timeout=30).bundle_version == resp.bundle_version

    broken = tmp_path / "broken"
    shutil.copytree(sample_bundle, broken)
    (broken / "dense.faiss").write_bytes(b"not an index")
    with pytest.raises(grpc.RpcError) as info:
        rstub.ReloadBundle(pb.ReloadBundleRequest(path=str(broken)), timeout=120)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "checksum mismatch for dense.faiss" in info.value.details()
    assert resp.bundle_version in info.value.details()  # says what keeps serving

    after = rstub.Search(pb.SearchRequest(query="drill", k=3), timeout=30)
    assert after.bundle_version == resp.bundle_version and len(after.items) == 3

    missing = rstub.ReloadBundle
    with pytest.raises(grpc.RpcError) as info:
        missing(pb.ReloadBundleRequest(path=str(tmp_path / "does-not-exist")), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_requests_during_reload_all_succeed_on_one_bundle(rstub, pb, sample_bundle, second_bundle):
    versions = {rstub.GetInfo(pb.GetInfoRequest(), timeout=10).bundle_version}
    errors, seen = [], []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = rstub.Search(pb.SearchRequest(query="cordless drill", k=5), timeout=30)
                seen.append(r.bundle_version)
            except grpc.RpcError as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for target in (sample_bundle, second_bundle):
        versions.add(rstub.ReloadBundle(pb.ReloadBundleRequest(path=str(target)), timeout=120).bundle_version)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert seen and set(seen) <= versions


def test_settle_heap_frees_a_swapped_out_cycle():
    """settle_heap freezes what is alive (out of the collector's sight) but unfreezes and collects first, so a
    runtime dropped at a swap (its batchers and it refer to each other: a cycle) is freed, not kept for ever."""
    import gc
    import weakref

    from server.runtime import settle_heap

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    gone = weakref.ref(a)
    settle_heap()  # frozen while referenced
    assert gc.get_freeze_count() > 0 and gone() is not None
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: an ordinary collection does not see it
    settle_heap()
    assert gone() is None
    gc.unfreeze()
