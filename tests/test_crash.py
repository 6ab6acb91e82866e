"""kill -9 during a stream of Feedback and UpsertItems: every acknowledged write is found after the
restart, and no request is half-applied (a server process is killed for real)."""
from __future__ import annotations

import threading
import time

import grpc


def test_kill9_loses_no_acknowledged_write(sample_bundle, tmp_path):
    from server.state import LiveState
    from training.served import ServedBundle, pb

    state = tmp_path / "state"
    acked_events: list[str] = []
    acked_items: list[str] = []
    sent = {"requests": 0}
    stop = threading.Event()

    with ServedBundle(sample_bundle, device="cpu", extra_args=("--state-dir", str(state))) as served:
        def stream() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if n % 5 == 0:
                        item = f"LIVE-{n}"
                        served.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=item, title=f"Live item {n}")]),
                                                timeout=10)
                        acked_items.append(item)
                    else:
                        evs = [pb.Event(event_id=f"r{n}-{j}", user_id=f"u{n % 7}", item_id=f"SR-{j + 1:05d}",
                                        type=pb.Event.VIEW) for j in range(4)]
                        sent["requests"] += 1
                        served.stub.Feedback(pb.FeedbackRequest(events=evs), timeout=10)
                        acked_events.extend(e.event_id for e in evs)
                except grpc.RpcError:
                    return  # the server is gone

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while len(acked_events) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        served.proc.kill()  # SIGKILL: no shutdown path runs
        served.proc.wait(10)
        stop.set()
        worker.join(10)

    assert len(acked_events) >= 200
    after = LiveState(state)
    found = set(after.event_ids)
    assert set(acked_events) <= found, "an acknowledged event was lost"
    # Nothing half-applied: each request's four events are all there or all absent.
    by_request: dict[str, int] = {}
    for eid in found:
        req = eid.split("-")[0]
        by_request[req] = by_request.get(req, 0) + 1
    assert set(by_request.values()) == {4}
    assert set(acked_items) <= {i for i, v in after.items.items() if v is not None}
    print(f"acked {len(acked_events)} events / {len(acked_items)} upserts; found {len(found)} events after kill -9; "
          f"torn tail {after.replay_report.torn_bytes} bytes")
    after.close()
