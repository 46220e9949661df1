"""The topic scheme: exact strings, device_of inverts it, bad names refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_golden import DEV, REQ_ID

from agent.wire import topics


def test_topic_strings_are_exact() -> None:
    t = topics.DeviceTopics(DEV)
    assert [t.telemetry, t.status, t.health, t.results, t.acks, t.commands] == [
        f"gluco/v1/dev/{DEV}/{leaf}" for leaf in ("telemetry", "status", "health", "results", "acks", "commands")
    ]
    assert topics.provision_request(REQ_ID) == f"gluco/v1/prov/{REQ_ID}/request"
    assert topics.provision_response(REQ_ID) == f"gluco/v1/prov/{REQ_ID}/response"
    assert topics.ALL_TELEMETRY == "gluco/v1/dev/+/telemetry"


def test_device_of_round_trip() -> None:
    t = topics.DeviceTopics(DEV)
    assert {topics.device_of(x) for x in (t.telemetry, t.results, t.status)} == {DEV}
    assert topics.device_of(topics.provision_request(REQ_ID)) is None


@pytest.mark.parametrize("bad", ["", "Gd-UPPER", "a/b", "+", "#", "x" * 65])
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid device id"):
        topics.DeviceTopics(bad)


@given(st.text(max_size=40))
def test_random_topics_and_names(text: str) -> None:
    device = topics.device_of(text)
    assert device is None or text == f"gluco/v1/dev/{device}/{text.rsplit('/', 1)[-1]}"
    for make, leaf in ((topics.provision_request, "request"), (topics.provision_response, "response")):
        try:
            topic = make(text)
        except ValueError:
            assert not topics.REQUEST_ID_RE.match(text)
        else:
            assert topics.REQUEST_ID_RE.match(text) and topic == f"gluco/v1/prov/{text}/{leaf}"
