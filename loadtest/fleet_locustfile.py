"""Locust in fleet mode: load through the gRPC proxy in front of several replicas, checking what a fleet
must keep true while it serves.

    locust -f loadtest/fleet_locustfile.py --headless -u 16 -r 8 -t 60s --host 127.0.0.1:PROXY_PORT

(`python -m fleet up` prints the proxy's address.) Besides the ordinary mix of the single-server locustfile
(Search with the Suggest calls and list pages that come with it, Recommend, SimilarItems, Feedback), each
simulated user checks, through the proxy, so that
consecutive calls usually land on different replicas:

- read-your-writes: after its Feedback is acknowledged, its very next Recommend counts that event
  (`history_events`), whichever replica answers; a miss is reported as a failure named "read-your-writes";
- catalog tokens: an UpsertItems' sequence token, passed to the next SimilarItems of the new item, must find
  it on whichever replica answers ("sequence-token");
- which replica answered GetInfo, tallied and printed at the end (the proxy's balance).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loadtest.locustfile as base  # noqa: E402  # gevent set up, the ordinary tasks, the interceptor (module, not its classes)

import collections  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import grpc  # noqa: E402
from locust import between, events, task  # noqa: E402

pb = base.pb
BATCH = 20  # events per simulated user before it starts over as a new one (below every history cap)
answered_by: collections.Counter = collections.Counter()


class FleetUser(base.SearchrecUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        super().on_start()
        self._new_user()

    def _new_user(self) -> None:
        self.fleet_user, self.fleet_events = f"fleet-{uuid.uuid4().hex[:12]}", 0

    def _violation(self, name: str, message: str) -> None:
        self.environment.events.request.fire(request_type="check", name=name, response_time=0, response_length=0,
                                             exception=AssertionError(message), context={})

    @task(10)
    def read_your_writes(self) -> None:
        if not base.USERS:
            return  # no recommender in this bundle
        if self.fleet_events >= BATCH:
            self._new_user()
        ev = pb.Event(event_id=uuid.uuid4().hex, user_id=self.fleet_user, item_id=base.random.choice(base.ITEMS),
                      type=pb.Event.VIEW, timestamp_ms=int(time.time() * 1000))
        try:
            self.stub.Feedback(pb.FeedbackRequest(events=[ev]), timeout=base.DEADLINE_S)
            self.fleet_events += 1
            got = self.stub.Recommend(pb.RecommendRequest(user_id=self.fleet_user, k=5),
                                      timeout=base.DEADLINE_S).history_events
        except grpc.RpcError:
            return  # reported by the interceptor
        if got != self.fleet_events:
            self._violation("read-your-writes", f"{self.fleet_user}: {self.fleet_events} events acknowledged, "
                                                f"the next Recommend counted {got}")

    @task(1)
    def sequence_token(self) -> None:
        item_id = f"fleet-item-{uuid.uuid4().hex[:12]}"
        try:
            up = self.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=item_id, title="Fleet probe lamp")]),
                                       timeout=5.0)
            self.stub.SimilarItems(pb.SimilarItemsRequest(item_id=item_id, k=3, min_sequence_token=up.sequence_token),
                                   timeout=base.DEADLINE_S)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                self._violation("sequence-token", f"{item_id} not found with its token {up.sequence_token}")

    # Weighted up since a Search task types its query first (Suggest calls, list pages: about six calls a task):
    # the balance tally needs enough GetInfo calls to show both replicas in a short run.
    @task(12)
    def which_replica(self) -> None:
        try:
            answered_by[self.stub.GetInfo(pb.GetInfoRequest(), timeout=base.DEADLINE_S).replica_id] += 1
        except grpc.RpcError:
            pass


@events.test_stop.add_listener
def _report_balance(environment, **_kw) -> None:
    total = sum(answered_by.values())
    if total:
        shares = ", ".join(f"{r} {100 * n / total:.0f}%" for r, n in sorted(answered_by.items()))
        print(f"GetInfo answered by: {shares} ({total} calls)", flush=True)
