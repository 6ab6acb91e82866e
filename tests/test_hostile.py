"""Hostile input, property-based: hypothesis builds requests for every RPC out of control characters,
very long strings, huge repeated fields, extreme numbers, NaN and infinities, empty values, duplicates
and unknown enum values (`loadtest.hostile`). Every answer must be a clear status (never INTERNAL,
UNKNOWN or a hang; INVALID_ARGUMENT / NOT_FOUND name their field), and the server must stay up with
bounded state."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest import hostile
from tests.conftest import serve

TEXT = st.one_of(st.sampled_from(hostile.STRINGS), st.text(max_size=60))


class HypothesisDraw:
    """hostile.Draw over hypothesis, so failures shrink to a minimal request."""

    def __init__(self, data) -> None:
        self.data = data

    def text(self) -> str:
        return self.data.draw(TEXT)

    def number(self) -> float:
        return self.data.draw(st.one_of(st.sampled_from(hostile.FLOATS), st.floats()))

    def int32(self) -> int:
        return self.data.draw(st.one_of(st.sampled_from(hostile.INT32), st.integers(-(2 ** 31), 2 ** 31 - 1)))

    def int64(self) -> int:
        return self.data.draw(st.one_of(st.sampled_from(hostile.INT64), st.integers(-(2 ** 63), 2 ** 63 - 1)))

    def enum(self) -> int:
        return self.data.draw(st.sampled_from(hostile.ENUMS))

    def flag(self) -> bool:
        return self.data.draw(st.booleans())

    def size(self) -> int:
        return self.data.draw(st.one_of(st.sampled_from(hostile.SIZES), st.integers(0, 5)))


MAX_USERS = 40


@pytest.fixture(scope="module")
def hostile_server(sample_bundle, tmp_path_factory):
    yield from serve(sample_bundle, state_dir=tmp_path_factory.mktemp("hostile") / "state", fsync=False,
                     max_live_users=MAX_USERS)


@pytest.fixture(scope="module")
def hstub(hostile_server):
    from server.stubs import pb_grpc

    with grpc.insecure_channel(hostile_server.target, options=[("grpc.max_send_message_length", 1 << 26)]) as ch:
        yield pb_grpc.SearchRecommendStub(ch)


EXAMPLES = {"Search": 80, "Recommend": 60, "SimilarItems": 60, "Feedback": 60, "UpsertItems": 30,
            "DeleteItems": 40, "ReloadBundle": 15, "GetInfo": 3,
            "Classify": 10, "Suggest": 40, "PutRules": 40, "DeleteRules": 20, "PutCampaigns": 60,
            "SetCampaignStatus": 20, "ListCampaigns": 10, "AdsReport": 30}  # this bundle has no classifier; test_classify_serving runs Classify on one that has


@pytest.mark.parametrize("rpc", list(hostile.BUILDERS))
def test_every_rpc_answers_hostile_input_with_a_clear_status(rpc, hstub, pb):
    @settings(max_examples=EXAMPLES[rpc], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        name, request = hostile.BUILDERS[rpc](pb, HypothesisDraw(data))
        code, details, field = hostile.call(hstub, name, request)
        assert hostile.problem(name, code, details, field) is None

    check()


def test_the_server_is_up_and_bounded_after_hostile_input(hostile_server, hstub, pb):
    # Runs after the property tests in this module (pytest keeps file order).
    info = hstub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.bundle_version and info.batcher.requests_failed == 0
    found = hstub.Search(pb.SearchRequest(query="cordless drill", k=3), timeout=30).items
    assert len(found) == 3
    alive = found[0].item_id  # hostile DeleteItems may have removed any fixed id
    live = hostile_server.server.holder.live
    assert len(live.users) <= MAX_USERS
    # A burst of new users beyond the ceiling still leaves it bounded (least recently active evicted).
    events = [pb.Event(event_id=f"bound-{i}", user_id=f"flood-{i}", item_id=alive, type=pb.Event.VIEW)
              for i in range(3 * MAX_USERS)]
    assert hstub.Feedback(pb.FeedbackRequest(events=events), timeout=30).accepted == len(events)
    assert len(live.users) == MAX_USERS and live.evicted_users >= 2 * MAX_USERS
    assert f"flood-{3 * MAX_USERS - 1}" in live.users and "flood-0" not in live.users
