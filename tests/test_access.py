"""Access control: TLS, mutual TLS, per-caller tokens with roles, pseudonymised user ids, safe decoding
of malformed request bytes, the maximum message size, and no pickle on the serving path."""
from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.certs import make_certs
from tests.conftest import ROOT, ServerThread, make_config, rpc_error, field_of


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls_channel(srv, certs, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    from server.client import open_channel

    return open_channel(srv.target, ca=str(certs.ca), cert=cert and str(cert), key=key and str(key))


def _search(ch: grpc.Channel, pb, metadata=None, timeout: float = 30):
    from server.stubs import pb_grpc

    return pb_grpc.SearchRecommendStub(ch).Search(pb.SearchRequest(query="drill", k=2), timeout=timeout,
                                                  metadata=metadata)


def test_tls_serves_tls_clients_and_refuses_plaintext(sample_bundle, certs, pb):
    srv = ServerThread(make_config(sample_bundle, tls_cert=certs.server_cert, tls_key=certs.server_key)).start()
    try:
        with _tls_channel(srv, certs) as ch:
            assert len(_search(ch, pb).items) == 2
        with grpc.insecure_channel(srv.target) as ch:
            assert rpc_error(_search, ch, pb, timeout=5).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(sample_bundle, certs, pb):
    srv = ServerThread(make_config(sample_bundle, tls_cert=certs.server_cert, tls_key=certs.server_key,
                                   tls_client_ca=certs.ca)).start()
    try:
        with _tls_channel(srv, certs, certs.client_cert, certs.client_key) as ch:
            assert len(_search(ch, pb).items) == 2
        from server.client import main as client

        tls = ["--target", srv.target, "--tls-ca", str(certs.ca)]
        assert client(tls + ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key),
                             "search", "drill", "--k", "2"]) == 0
        assert client(tls + ["--timeout", "5", "search", "drill"]) == 1  # no client certificate
        for cert, key in ((None, None), (certs.stranger_cert, certs.stranger_key)):
            with _tls_channel(srv, certs, cert, key) as ch:
                assert rpc_error(_search, ch, pb, timeout=5).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_tls_and_tokens_config_errors_are_clear(sample_bundle, certs, tmp_path):
    from server.access import AccessConfigError
    from server.app import SearchrecServer

    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        make_config(sample_bundle, tls_cert=certs.server_cert)
    with pytest.raises(AccessConfigError, match=r"--tls-key .*missing\.key: cannot read it"):
        SearchrecServer(make_config(sample_bundle, tls_cert=certs.server_cert, tls_key=tmp_path / "missing.key"))
    bad = tmp_path / "tokens.json"
    for doc, message in (("{", "not JSON"), ('{"callers": []}', "at least one caller"),
                         ('{"callers": [{"name": "a", "token": "t", "roles": ["root"]}]}', r"unknown roles \['root'\]"),
                         ('{"callers": [{"name": "a"}]}', "needs token_sha256"),
                         ('{"callers": [{"name": "a", "token": "t"}, {"name": "b", "token": "t"}]}', "same token as a")):
        bad.write_text(doc)
        with pytest.raises(AccessConfigError, match=message):
            SearchrecServer(make_config(sample_bundle, tokens=bad))


@pytest.fixture(scope="module")
def token_server(sample_bundle, second_bundle, tmp_path_factory):
    from server.access import hash_token

    d = tmp_path_factory.mktemp("tokens")
    (d / "tokens.json").write_text(json.dumps({"callers": [
        {"name": "storefront", "token_sha256": hash_token("read-secret"), "roles": ["read"]},
        {"name": "ingest", "token": "write-secret", "roles": ["read", "write"]},
        {"name": "deployer", "token": "reload-secret", "roles": ["reload"]},
    ]}))
    srv = ServerThread(make_config(sample_bundle, tokens=d / "tokens.json", state_dir=d / "state", fsync=False)).start()
    yield srv
    srv.stop()


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_tokens_gate_every_rpc_by_role(token_server, pb, second_bundle):
    from server.stubs import pb_grpc

    with grpc.insecure_channel(token_server.target) as ch:
        stub = pb_grpc.SearchRecommendStub(ch)
        for metadata in (None, _bearer("wrong"), (("authorization", "Basic read-secret"),)):
            err = rpc_error(lambda: stub.Search(pb.SearchRequest(query="drill"), timeout=10, metadata=metadata))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(stub.Search(pb.SearchRequest(query="drill", k=2), timeout=30, metadata=_bearer("read-secret")).items) == 2
        assert stub.Recommend(pb.RecommendRequest(user_id="U0001", k=2), timeout=30,
                              metadata=_bearer("read-secret")).items

        live = token_server.server.holder.live
        before = live.log.size
        feedback = pb.FeedbackRequest(events=[pb.Event(event_id="tok-1", user_id="u", item_id="SR-00001",
                                                        type=pb.Event.CLICK)])
        err = rpc_error(lambda: stub.Feedback(feedback, timeout=10, metadata=_bearer("read-secret")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'storefront' may not call Feedback" in err.details() and "'write' role" in err.details()
        assert live.log.size == before  # refused before anything was written
        for call in (lambda: stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="T-1", title="t")]),
                                              timeout=10, metadata=_bearer("read-secret")),
                     lambda: stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["SR-00001"]), timeout=10,
                                              metadata=_bearer("read-secret")),
                     lambda: stub.ReloadBundle(pb.ReloadBundleRequest(path=str(second_bundle)), timeout=10,
                                               metadata=_bearer("write-secret"))):
            assert rpc_error(call).code() == grpc.StatusCode.PERMISSION_DENIED
        assert live.log.size == before
        assert stub.Feedback(feedback, timeout=10, metadata=_bearer("write-secret")).accepted == 1
        assert live.log.size > before
        # The reload role alone cannot search, but can reload.
        err = rpc_error(lambda: stub.Search(pb.SearchRequest(query="drill"), timeout=10, metadata=_bearer("reload-secret")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        resp = stub.ReloadBundle(pb.ReloadBundleRequest(path=str(second_bundle)), timeout=120,
                                 metadata=_bearer("reload-secret"))
        assert resp.bundle_version.startswith("second-")
        # The shell client sends its token the same way.
        from server.client import main as client

        assert client(["--target", token_server.target, "--token", "read-secret", "search", "drill", "--k", "1"]) == 0
        assert client(["--target", token_server.target, "--token", "read-secret", "feedback", "u", "SR-00002"]) == 1
        assert client(["--target", token_server.target, "--token", "write-secret", "feedback", "u", "SR-00002"]) == 0
        assert client(["--target", token_server.target, "search", "drill"]) == 1
        # Health probes need no token.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_user_ids_are_pseudonymised_before_the_event_store_and_logs(sample_bundle, tmp_path, pb, caplog):
    from server.access import Pseudonymiser
    from server.state import LiveState
    from server.stubs import pb_grpc

    key = tmp_path / "user.key"
    key.write_bytes(b"0123456789abcdef-not-a-real-secret")
    state = tmp_path / "state"
    caplog.set_level(logging.DEBUG)
    user = "alice@example.com"
    srv = ServerThread(make_config(sample_bundle, state_dir=state, fsync=False, user_id_key=key)).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            before = [i.item_id for i in stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=30).items]
            stub.Feedback(pb.FeedbackRequest(events=[pb.Event(event_id="e1", user_id=user, item_id="SR-00100",
                                                              type=pb.Event.PURCHASE)]), timeout=10)
            after = [i.item_id for i in stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=30).items]
    finally:
        srv.stop()
    assert after != before  # the pseudonym still ties the user's events to the user's next request
    stored = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    assert user.encode() not in stored and b"alice" not in stored
    pseudonym = Pseudonymiser(key.read_bytes().strip())(user)
    assert pseudonym.encode() in stored
    assert list(LiveState(state).users) == [pseudonym]
    assert "alice" not in caplog.text


def test_malformed_request_bytes_get_invalid_argument(server, pb):
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_unary("/searchrec.v1.SearchRecommend/Search")  # no serializers: bytes in, bytes out
        for data in (b"\x0a\x02\xff\xfe", b"\x0a\x7f", b"\xff\xff\xff"):  # bad UTF-8, truncated, bad tag
            err = rpc_error(lambda: raw(data, timeout=10))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, err.details())
            assert "not a valid SearchRequest message" in err.details() and field_of(err) == "request"
        ok = raw(pb.SearchRequest(query="drill", k=1).SerializeToString(), timeout=30)
        assert len(pb.SearchResponse.FromString(ok).items) == 1


def test_messages_over_the_size_limit_are_refused(sample_bundle, pb):
    from server.stubs import pb_grpc

    srv = ServerThread(make_config(sample_bundle, max_message_bytes=64 * 1024)).start()
    try:
        with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 1 << 24)]) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            big = pb.SearchRequest(query="drill", filters=pb.Filters(item_ids=["x" * 100] * 1000))
            err = rpc_error(lambda: stub.Search(big, timeout=10))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(stub.Search(pb.SearchRequest(query="drill", k=1), timeout=30).items) == 1
    finally:
        srv.stop()


SERVING_PATH = ("server", "common", "kernels")


def test_no_pickle_or_unsafe_torch_load_on_the_serving_path():
    problems = []
    for pkg in SERVING_PATH:
        for path in sorted((ROOT / pkg).glob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                    if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                        problems.append(f"{where}: imports a pickle module")
                if isinstance(node, ast.Call):
                    func = ast.unparse(node.func)
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if func.endswith("torch.load") and kw.get("weights_only") != "True":
                        problems.append(f"{where}: torch.load without weights_only=True")
                    if func in ("np.load", "numpy.load") and kw.get("allow_pickle") != "False":
                        problems.append(f"{where}: np.load without allow_pickle=False")
                    if func.endswith("from_pretrained") and "AutoModel" in func and kw.get("use_safetensors") != "True":
                        problems.append(f"{where}: model weights loaded without use_safetensors=True")
    assert not problems, problems
