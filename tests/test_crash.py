"""kill -9 during a stream of Feedback and UpsertItems: every acknowledged write is found after the
restart, and no request is half-applied (a server process is killed for real; `loadtest.scenarios.kill9`)."""
from __future__ import annotations

import json

from loadtest import scenarios


def test_kill9_loses_no_acknowledged_write(sample_bundle, tmp_path):
    from training.served import ServedBundle

    state = tmp_path / "state"
    with ServedBundle(sample_bundle, device="cpu", extra_args=("--state-dir", str(state))) as served:
        r = scenarios.kill9(served, state, min_events=200)
    print(json.dumps(r))
    assert r["events_acked"] >= 200 and r["items_acked"] > 0
    assert r["events_lost"] == 0, "an acknowledged event was lost"
    assert r["items_lost"] == 0, "an acknowledged upsert was lost"
    # Nothing half-applied: each request's four events are all there or all absent.
    assert r["half_applied_requests"] == 0
    # At most the one request in flight at the kill is on disk without having been acknowledged.
    assert r["events_found"] - r["events_acked"] <= 4
