"""A fleet: replicas sharing state in a real redis-server (started here, on a free loopback port, in a
temporary folder), and nginx as the gRPC proxy in front of them.

Replicas run in this process (tests.conftest.ServerThread) or as `python -m server` processes; each test
uses its own key prefix in the store, so tests do not see each other's state.
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fleet.procs import ROOT, Nginx, RedisServer, Replica, free_port
from loadtest.scenarios import wait_until
from tests.conftest import ServerThread, make_config, rpc_error

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
def prefix() -> str:
    return f"t{next(_prefixes)}-{time.time_ns()}"


def start_replica(bundle: Path, redis_server: RedisServer, prefix: str, name: str, **overrides) -> ServerThread:
    return ServerThread(make_config(bundle, state=redis_server.url, state_prefix=prefix, replica_id=name,
                                    **overrides)).start()


@pytest.fixture
def pair(sample_bundle, redis_server, prefix):
    """Two replicas, a and b, on one store."""
    a = start_replica(sample_bundle, redis_server, prefix, "a")
    b = start_replica(sample_bundle, redis_server, prefix, "b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def stub_for(target: str):
    from server.stubs import pb_grpc

    return pb_grpc.SearchRecommendStub(grpc.insecure_channel(target))


def event(pb, eid: str, user: str, item: str = "SR-00001", kind=None):
    return pb.Event(event_id=eid, user_id=user, item_id=item, type=kind or pb.Event.VIEW)


# --- cross-replica consistency ----------------------------------------------------------------

def test_feedback_on_one_replica_is_read_by_the_next_recommend_on_another(pair, pb):
    a, b = pair
    sa, sb = stub_for(a.target), stub_for(b.target)
    violations = []
    n = 2000
    for i in range(n):  # back to back: no pause between the acknowledged write and the read
        user = f"ryw-{i % 400}"
        expected = i // 400 + 1  # events this user has after this write
        sa.Feedback(pb.FeedbackRequest(events=[event(pb, f"ryw-{i}", user, f"SR-{i % 50 + 1:05d}")]))
        got = sb.Recommend(pb.RecommendRequest(user_id=user, k=5)).history_events
        if got != expected:
            violations.append((i, expected, got))
    assert violations == [], f"{len(violations)} of {n} reads on b missed a's acknowledged write: {violations[:5]}"


def test_event_ids_are_idempotent_across_replicas(pair, pb):
    a, b = pair
    req = pb.FeedbackRequest(events=[event(pb, "dup-1", "dup-user"), event(pb, "dup-2", "dup-user")])
    first = stub_for(a.target).Feedback(req)
    again = stub_for(b.target).Feedback(req)
    assert (first.accepted, first.duplicates) == (2, 0)
    assert (again.accepted, again.duplicates) == (0, 2)
    assert stub_for(b.target).Recommend(pb.RecommendRequest(user_id="dup-user")).history_events == 2


def test_a_catalog_change_is_visible_on_every_replica_and_its_token_reads_it_at_once(pair, pb):
    a, b = pair
    sa, sb = stub_for(a.target), stub_for(b.target)
    up = sa.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="FLEET-1", title="Solar garden lantern",
                                                             price=12.5, category="Garden")]))
    assert up.sequence_token
    # With the token, b answers only once it has applied the change: the very next read sees it.
    hits = sb.Search(pb.SearchRequest(query="solar garden lantern", k=3, min_sequence_token=up.sequence_token)).items
    assert hits[0].item_id == "FLEET-1"
    assert sb.SimilarItems(pb.SimilarItemsRequest(item_id="FLEET-1", k=2,
                                                  min_sequence_token=up.sequence_token)).items
    gone = sb.DeleteItems(pb.DeleteItemsRequest(item_ids=["FLEET-1"]))
    hits = sa.Search(pb.SearchRequest(query="solar garden lantern", k=3, min_sequence_token=gone.sequence_token)).items
    assert "FLEET-1" not in [h.item_id for h in hits]
    # Without a token, the change reaches the other replica by itself (the bound is 1 s; not timed here).
    up2 = sb.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="FLEET-2", title="Copper rain chain")]))
    wait_until(lambda: stub_for(a.target).GetInfo(pb.GetInfoRequest()).applied_token == up2.sequence_token, 30,
               "replica a to apply b's change")
    hits = sa.Search(pb.SearchRequest(query="copper rain chain", k=1)).items
    assert hits[0].item_id == "FLEET-2"


def test_storefront_state_is_shared_rules_page_tokens_and_suggestions(pair, sample_bundle, redis_server, prefix, pb):
    """A rule put on a, read at its token on b; a page token issued by a is accepted by b (one key in the store);
    a query engaged on a becomes a suggestion on b; a replica started later has the rules."""
    a, b = (stub_for(r.target) for r in pair)
    put = a.PutRules(pb.PutRulesRequest(rules=[pb.Rule(rule_id="pin", query="cordless drill",
                                                       pin=pb.Pin(item_id="SR-00196", position=1))]))
    first = b.Search(pb.SearchRequest(query="cordless drill", k=3, explain=True, min_sequence_token=put.sequence_token))
    assert first.items[0].item_id == "SR-00196" and first.rules_fired[0].rule_id == "pin"
    page1 = a.Search(pb.SearchRequest(query="drill", k=2, paged=True))
    page2 = b.Search(pb.SearchRequest(query="drill", k=2, paged=True, page_token=page1.next_page_token))
    whole = a.Search(pb.SearchRequest(query="drill", k=4, offset=0))
    assert [i.item_id for i in page1.items] + [i.item_id for i in page2.items] == [i.item_id for i in whole.items]
    a.Feedback(pb.FeedbackRequest(events=[pb.Event(event_id="sg-1", user_id="u", item_id="SR-00220",
                                                   type=pb.Event.CLICK, query="bistro patio dining set")]))
    wait_until(lambda: any(s.text == "bistro patio dining set"
                           for s in b.Suggest(pb.SuggestRequest(prefix="bistro p", k=20)).suggestions), 30,
               "the engaged query on replica b")
    c = start_replica(sample_bundle, redis_server, prefix, "c")
    try:
        assert [r.rule_id for r in stub_for(c.target).ListRules(pb.ListRulesRequest()).rules] == ["pin"]
    finally:
        c.stop()


def test_bad_sequence_tokens_are_refused_naming_the_field(pair, pb):
    a, _ = pair
    sa = stub_for(a.target)
    for token, says in (("not-a-token", "not a sequence token"), ("99999999999999-0", "ahead of the newest change")):
        err = rpc_error(sa.Search, pb.SearchRequest(query="drill", min_sequence_token=token))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_sequence_token" in err.details() and says in err.details()


def test_a_new_replica_catches_up_on_every_change_before_serving(pair, sample_bundle, redis_server, prefix, pb):
    a, _ = pair
    sa = stub_for(a.target)
    tokens = [sa.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"CATCH-{i}", title=f"Catch-up lamp {i}")]))
              .sequence_token for i in range(3)]
    last = sa.DeleteItems(pb.DeleteItemsRequest(item_ids=["CATCH-0"])).sequence_token
    sa.Feedback(pb.FeedbackRequest(events=[event(pb, "cu-1", "cu-user"), event(pb, "cu-2", "cu-user")]))
    c = start_replica(sample_bundle, redis_server, prefix, "c")  # SERVING only once it has caught up
    try:
        sc = stub_for(c.target)
        info = sc.GetInfo(pb.GetInfoRequest())
        assert info.applied_token == last and tokens[-1] < last
        ids = [h.item_id for h in sc.Search(pb.SearchRequest(query="catch-up lamp", k=5)).items]
        assert "CATCH-1" in ids and "CATCH-2" in ids and "CATCH-0" not in ids
        assert sc.Recommend(pb.RecommendRequest(user_id="cu-user")).history_events == 2
        assert {r.replica_id for r in info.replicas} == {"a", "b", "c"}
    finally:
        c.stop()


# --- fleet-wide bundle rollout ----------------------------------------------------------------

def test_reload_on_one_replica_rolls_the_bundle_out_to_the_fleet(pair, second_bundle, pb):
    a, b = pair
    sa, sb = stub_for(a.target), stub_for(b.target)
    old = sb.GetInfo(pb.GetInfoRequest()).bundle_version
    resp = sa.ReloadBundle(pb.ReloadBundleRequest(path=str(second_bundle)), timeout=300)
    assert resp.previous_version == old and resp.bundle_version.startswith("second-")
    wait_until(lambda: sb.GetInfo(pb.GetInfoRequest()).bundle_version == resp.bundle_version, 60,
               "replica b to swap")
    fleet = sa.GetInfo(pb.GetInfoRequest()).replicas
    wait_until(lambda: {r.bundle_version for r in sa.GetInfo(pb.GetInfoRequest()).replicas} == {resp.bundle_version},
               10, "every heartbeat to report the new version")
    assert {r.replica_id for r in fleet} == {"a", "b"}


def test_a_bundle_refused_by_a_replica_leaves_the_whole_fleet_on_the_old_one(pair, sample_bundle, tmp_path, pb):
    a, b = pair
    broken = tmp_path / "broken"
    shutil.copytree(sample_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["bundle_version"] = "broken-1"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "items.parquet").write_bytes(b"not parquet")  # fails its checksum
    old = stub_for(b.target).GetInfo(pb.GetInfoRequest()).bundle_version
    err = rpc_error(stub_for(a.target).ReloadBundle, pb.ReloadBundleRequest(path=str(broken)), timeout=300)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "replica" in err.details() and old in err.details() and "checksum" in err.details()
    for s in (a, b):
        assert stub_for(s.target).GetInfo(pb.GetInfoRequest()).bundle_version == old


# --- the store going away and coming back ----------------------------------------------------

def test_redis_lost_refuses_writes_keeps_reads_and_recovers(sample_bundle, tmp_path, pb):
    redis = RedisServer(tmp_path / "redis").start()
    a = ServerThread(make_config(sample_bundle, state=redis.url, replica_id="a", metrics_port=0)).start()

    def metrics() -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{a.server.metrics_port}/metrics", timeout=10).read().decode()

    try:
        sa = stub_for(a.target)
        sa.Feedback(pb.FeedbackRequest(events=[event(pb, "lost-1", "lost-user")]))
        assert 'searchrec_state_up{backend="redis"} 1.0' in metrics()
        redis.kill()  # SIGKILL: the acknowledged event is in the AOF
        err = rpc_error(sa.Feedback, pb.FeedbackRequest(events=[event(pb, "lost-2", "lost-user")]))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "nothing was acknowledged" in err.details()
        err = rpc_error(sa.UpsertItems, pb.UpsertItemsRequest(items=[pb.Item(item_id="LOST-1", title="x lamp")]))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        # Reads answer from the last known state, and say so.
        assert sa.Recommend(pb.RecommendRequest(user_id="lost-user")).history_events == 1
        assert sa.Search(pb.SearchRequest(query="drill", k=2)).items
        info = sa.GetInfo(pb.GetInfoRequest())
        assert not info.state_up and info.stale_reads >= 1
        text = metrics()
        assert 'searchrec_state_up{backend="redis"} 0.0' in text
        assert "searchrec_state_stale_reads_total 1.0" in text or "searchrec_state_stale_reads_total 2.0" in text
        assert "searchrec_state_write_failures_total 2.0" in text
        redis = RedisServer(redis.folder, port=redis.port).start()  # same data folder and port
        wait_until(lambda: sa.GetInfo(pb.GetInfoRequest()).state_up, 30, "the replica to reconnect")
        assert sa.Feedback(pb.FeedbackRequest(events=[event(pb, "lost-2", "lost-user")])).accepted == 1
        assert sa.Recommend(pb.RecommendRequest(user_id="lost-user")).history_events == 2
    finally:
        a.stop()
        redis.stop()


def test_unreachable_store_at_start_is_a_clear_error_naming_the_url(sample_bundle):
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "server", "--bundle", str(sample_bundle), "--port", "0",
                           "--device", "cpu", "--state", f"redis://:secret@127.0.0.1:{port}/0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"cannot reach the state store redis://:***@127.0.0.1:{port}/0" in proc.stderr
    assert "secret" not in proc.stdout + proc.stderr


def test_store_credentials_and_pseudonymised_user_ids(sample_bundle, tmp_path, pb):
    import redis as redis_client

    redis = RedisServer(tmp_path / "redis", user="searchrec", password="s3cret-pw").start()
    try:
        from server.store import StoreError

        bad = make_config(sample_bundle, state=redis.url, state_username="searchrec", state_password="wrong")
        with pytest.raises(StoreError, match="cannot reach the state store"):
            ServerThread(bad).start()
        key = tmp_path / "user.key"
        key.write_text("k" * 32)
        good = make_config(sample_bundle, state=redis.url, state_username="searchrec", state_password="s3cret-pw",
                           user_id_key=key)
        assert "s3cret-pw" not in good.describe() and "s3cret-pw" not in repr(good)
        a = ServerThread(good).start()
        try:
            stub_for(a.target).Feedback(pb.FeedbackRequest(events=[event(pb, "p-1", "alice@example.com")]))
            assert stub_for(a.target).Recommend(pb.RecommendRequest(user_id="alice@example.com")).history_events == 1
        finally:
            a.stop()
        r = redis_client.Redis(port=redis.port, username="searchrec", password="s3cret-pw", decode_responses=True)
        dump = " ".join(r.keys("*")) + " ".join(str(v) for _, v in r.xrange("searchrec:events"))
        assert "alice" not in dump and "searchrec:u:" in dump
    finally:
        redis.stop()


def test_store_over_tls(sample_bundle, tmp_path, pb):
    from tests.certs import make_certs

    certs = make_certs(tmp_path / "certs")  # the server certificate names 127.0.0.1 and localhost
    with RedisServer(tmp_path / "redis", tls=(certs.server_cert, certs.server_key, certs.ca)) as redis:
        assert redis.url.startswith("rediss://")
        plain = make_config(sample_bundle, state=redis.url.replace("rediss://", "redis://"))
        with pytest.raises(Exception, match="cannot reach the state store"):
            ServerThread(plain).start()  # a plaintext client is refused by a TLS-only Redis
        a = ServerThread(make_config(sample_bundle, state=redis.url, state_tls_ca=certs.ca, replica_id="tls")).start()
        try:
            s = stub_for(a.target)
            assert s.Feedback(pb.FeedbackRequest(events=[event(pb, "tls-1", "tls-user")])).accepted == 1
            assert s.Recommend(pb.RecommendRequest(user_id="tls-user")).history_events == 1
            assert s.GetInfo(pb.GetInfoRequest()).state_url.startswith("rediss://")
        finally:
            a.stop()


# --- the proxy and many processes --------------------------------------------------------------

def test_nginx_balances_calls_over_replicas_and_retries_reads_past_a_dead_one(pair, tmp_path, pb):
    a, b = pair
    with Nginx(tmp_path / "nginx", [a.port, b.port]) as proxy:
        sp = stub_for(proxy.target)
        seen = {sp.GetInfo(pb.GetInfoRequest()).replica_id for _ in range(20)}
        assert seen == {"a", "b"}  # per-call balancing over one client connection
        assert sp.Search(pb.SearchRequest(query="cordless drill", k=3)).items
        err = rpc_error(sp.Search, pb.SearchRequest(query="", k=3))  # status codes and details pass through
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in err.details()
        b.stop()
        for _ in range(20):  # every read answered: nginx retries on a once it cannot reach b
            assert sp.Search(pb.SearchRequest(query="garden hose", k=2)).items
        a.stop()
        err = rpc_error(sp.Search, pb.SearchRequest(query="garden hose", k=2), timeout=10)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "no searchrec replica" in err.details()


def test_classification_in_a_fleet(clf_bundle, redis_server, prefix, tmp_path, pb):
    from tests.conftest import LOCOMOTIVE

    a = start_replica(clf_bundle, redis_server, prefix, "a", autofill_threshold=0.5)
    b = start_replica(clf_bundle, redis_server, prefix, "b", autofill_threshold=0.5)
    try:
        resp = stub_for(a.target).UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="F-1", title=LOCOMOTIVE)]))
        assert resp.category_fills[0].filled
        # Replica b applies the item as stored: the predicted category and its mark, not a prediction of its own.
        found = stub_for(b.target).Search(pb.SearchRequest(query="locomotive", k=1, min_sequence_token=resp.sequence_token,
                                                           filters=pb.Filters(item_ids=["F-1"]))).items[0]
        assert found.category == "Toys > Vehicles > Trains" and found.category_predicted
        with Nginx(tmp_path / "nginx", [a.port, b.port]) as proxy:
            sp = stub_for(proxy.target)
            for _ in range(6):  # Classify is routed (and retried) like the other reads
                assert sp.Classify(pb.ClassifyRequest(queries=["jigsaw puzzle"])).queries[0].categories
            b.stop()
            for _ in range(6):
                assert sp.Classify(pb.ClassifyRequest(queries=["garden hose"])).queries[0].categories
    finally:
        a.stop()
        b.stop()


def test_workers_runs_replica_processes_that_share_the_store(sample_bundle, redis_server, prefix, tmp_path, pb):
    port = free_port()
    while free_port() == port + 1:  # the second worker takes port + 1
        pass
    proc = subprocess.Popen([sys.executable, "-m", "server", "--bundle", str(sample_bundle), "--port", str(port),
                             "--device", "cpu", "--workers", "2", "--state", redis_server.url, "--state-prefix", prefix,
                             "--replica-id", "w"], cwd=ROOT, stdout=open(tmp_path / "out.log", "w"),
                            stderr=subprocess.STDOUT)
    try:
        workers = [Replica(sample_bundle, redis_server.url, tmp_path, port=port + i) for i in range(2)]
        for w in workers:
            wait_until(w.serving, 300, f"worker on {w.target}")
        s0, s1 = stub_for(workers[0].target), stub_for(workers[1].target)
        assert {s0.GetInfo(pb.GetInfoRequest()).replica_id, s1.GetInfo(pb.GetInfoRequest()).replica_id} == {"w-0", "w-1"}
        s0.Feedback(pb.FeedbackRequest(events=[event(pb, "w-e1", "w-user")]))
        assert s1.Recommend(pb.RecommendRequest(user_id="w-user")).history_events == 1
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, (tmp_path / "out.log").read_text()[-2000:]


def test_workers_refuse_a_local_log(sample_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server", "--bundle", str(sample_bundle), "--port", "50999",
                           "--workers", "2", "--state-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--state redis://" in proc.stderr


def test_fleet_harness_starts_redis_replicas_and_nginx_and_stops_them(sample_bundle, tmp_path, pb):
    import signal

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "up", "--bundle", str(sample_bundle), "--replicas", "2",
                             "--port", str(port), "--work", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "fleet up" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the harness exited before the fleet was up"
        s = stub_for(f"127.0.0.1:{port}")
        assert {r.replica_id for r in s.GetInfo(pb.GetInfoRequest(), timeout=10).replicas} == {"replica-0", "replica-1"}
        assert s.Search(pb.SearchRequest(query="cordless drill", k=2), timeout=10).items
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "fleet stopped" in out
    assert (tmp_path / "redis" / "appendonlydir").is_dir()  # Redis kept its AOF in the work folder


def test_store_password_comes_from_a_file_or_env_and_is_never_printed(tmp_path, monkeypatch):
    from server.config import from_args

    secret = tmp_path / "redis.pw"
    secret.write_text("pw-from-file\n")
    cfg = from_args(["--bundle", "b", "--state", "redis://:inline-pw@127.0.0.1:6379/0", "--state-username", "app",
                     "--state-password-file", str(secret)])
    assert cfg.state_password == "pw-from-file"
    shown = cfg.describe() + repr(cfg)
    assert "pw-from-file" not in shown and "inline-pw" not in shown and "redis://:***@127.0.0.1:6379/0" in shown
    monkeypatch.setenv("SEARCHREC_STATE_PASSWORD", "pw-from-env")
    assert from_args(["--bundle", "b", "--state", "redis://127.0.0.1:6379/0"]).state_password == "pw-from-env"
    with pytest.raises(SystemExit):  # argparse's clear error, exit status 2
        from_args(["--bundle", "b", "--state", "redis://x", "--state-password-file", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        from_args(["--bundle", "b", "--state", "http://x"])  # not a Redis URL


def test_ad_budgets_caps_and_charges_are_shared_by_the_fleet(sample_bundle, redis_server, prefix, pb):
    """Two replicas sell one campaign's clicks: charged once per auction whichever replica hears the click,
    the budget stops the whole fleet (at most one click's price over), frequency caps count on both."""
    a = start_replica(sample_bundle, redis_server, prefix, "a", ads_pacing=False)
    b = start_replica(sample_bundle, redis_server, prefix, "b", ads_pacing=False)
    try:
        sa, sb = stub_for(a.target), stub_for(b.target)
        base = [it.item_id for it in sa.Search(pb.SearchRequest(query="cordless drill", k=10, ad_slots=0)).items]
        token = sa.PutCampaigns(pb.PutCampaignsRequest(campaigns=[pb.Campaign(
            campaign_id="fleet", advertiser="acme", item_ids=base[1:4], max_cpc=0.5, daily_budget=1.0)])).sequence_token
        capped = sb.PutCampaigns(pb.PutCampaignsRequest(campaigns=[pb.Campaign(
            campaign_id="cap", advertiser="bolt", item_ids=base[4:7], max_cpc=0.06, daily_budget=100,
            frequency_cap=1)])).sequence_token
        spent, charged, prices = 0.0, 0, []
        for n in range(40):
            server_stub, other = (sa, sb) if n % 2 == 0 else (sb, sa)
            resp = server_stub.Search(pb.SearchRequest(query="cordless drill", user_id=f"u{n}",
                                                       min_sequence_token=capped))
            ads = [s for s in resp.sponsored if s.campaign_id == "fleet"]
            if not ads:
                break
            ad = ads[0]
            click = pb.Event(event_id=f"click-{n}", user_id=f"u{n}", item_id=ad.item.item_id, type=pb.Event.CLICK,
                             auction_id=ad.auction_id)
            r = other.Feedback(pb.FeedbackRequest(events=[click]))  # the click lands on the other replica
            again = server_stub.Feedback(pb.FeedbackRequest(events=[pb.Event(
                event_id=f"click-{n}-again", user_id=f"u{n}", item_id=ad.item.item_id, type=pb.Event.CLICK,
                auction_id=ad.auction_id)]))
            assert again.charged == 0  # a second click on the same auction, on the first replica: not charged
            charged += r.charged
            spent += ad.cpc * r.charged
            prices.append(ad.cpc)
            wait_until(lambda: abs(stub_spent(sb, pb) - spent) < 1e-6 and abs(stub_spent(sa, pb) - spent) < 1e-6, 10,
                       "both replicas see the spend")
        assert prices and 1.0 <= spent < 1.0 + max(prices)
        for s in (sa, sb):
            report = s.AdsReport(pb.AdsReportRequest(campaign_ids=["fleet"])).rows
            assert report[0].spend == pytest.approx(spent) and report[0].clicks == charged
        # The frequency cap of 1 holds across replicas for one user.
        user_ads = [len([x for x in s.Search(pb.SearchRequest(query="cordless drill", user_id="capped-user",
                                                               min_sequence_token=token)).sponsored
                         if x.campaign_id == "cap"]) for s in (sa, sb, sa)]
        assert sum(user_ads) <= 1
    finally:
        a.stop()
        b.stop()


def stub_spent(stub, pb) -> float:
    return {c.campaign_id: c.state.spent_today for c in stub.ListCampaigns(pb.ListCampaignsRequest()).campaigns}["fleet"]
