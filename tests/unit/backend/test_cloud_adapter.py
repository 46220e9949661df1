"""The reference cloud's glucoagent adapter reads and sends exactly on today's topics."""

from __future__ import annotations

import pytest

from agent.wire import topics
from backend.clouds.adapter import ACK, CHUNK, COMMAND, PROVISION, TIME_REPLY, CloudAdapter, Delivered, adapter_for

DEV = "gd-0123456789ab"


def test_glucoagent_adapter_topics() -> None:
    a = adapter_for("glucoagent")
    t = topics.DeviceTopics(DEV)
    assert a.ack_interval_s == 0
    assert a.ingest_topics() == [topics.ALL_TELEMETRY, topics.ALL_HEALTH]
    assert set(a.control_topics()) == {
        topics.ALL_PROVISION_REQUESTS, topics.ALL_STATUS, topics.ALL_RESULTS, topics.ALL_FETCH, topics.ALL_TIME,
    }
    for leaf in (topics.TELEMETRY, topics.HEALTH, topics.STATUS, topics.RESULTS, topics.FETCH, topics.TIME):
        assert a.incoming(t._t(leaf), b"p") == Delivered(leaf, DEV, b"p")
    assert a.incoming(topics.provision_request("abcdefgh12"), b"r") == Delivered(PROVISION, "abcdefgh12", b"r")
    assert a.incoming(t.acks, b"") is None and a.incoming("elsewhere/x", b"") is None
    assert a.to_device(DEV, ACK, b"a").topic == t.acks
    assert a.to_device(DEV, TIME_REPLY, b"a").topic == t.acks
    assert a.to_device(DEV, COMMAND, b"c", ttl_s=5).topic == t.commands
    assert a.to_device(DEV, CHUNK, b"c").topic == t.chunks
    assert a.provision_reply("abcdefgh12", b"x").topic == topics.provision_response("abcdefgh12")
    assert a.results_topic(DEV) == t.results


def test_unknown_adapter() -> None:
    with pytest.raises(ValueError, match="no adapter"):
        adapter_for("nimbus")
    assert isinstance(adapter_for("glucoagent"), CloudAdapter)
