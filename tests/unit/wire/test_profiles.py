"""The cloud-profile seam: the glucoagent profile is exactly agent/wire/topics.py; profiles are chosen and
checked from the mqtt options."""

from __future__ import annotations

import pytest

from agent.config import MqttSection
from agent.wire import profiles
from agent.wire.profiles import ACK, COMMAND, UNKNOWN, CloudProfile, make_profile
from agent.wire.provisioning import STATUS_OFFLINE
from agent.wire.topics import DeviceTopics

DEV = "gd-0123456789ab"


def test_glucoagent_profile_is_todays_topic_scheme() -> None:
    p = make_profile("glucoagent")
    t = DeviceTopics(DEV)
    assert p.client_id(DEV) == DEV and p.username(DEV) is None
    assert p.protocol("mqttv5") == "mqttv5" and p.protocol("mqttv311") == "mqttv311"
    assert p.keepalive(60) == 60 and p.inflight(4) == 4
    assert p.payload_limit(profiles.TELEMETRY) is None and p.max_publish_rate is None
    assert p.status_messages and p.side_connections and p.enrolment == "claim"
    for kind, topic in [
        (profiles.TELEMETRY, t.telemetry),
        (profiles.HEALTH, t.health),
        (profiles.RESULTS, t.results),
        (profiles.TIME, t.time),
    ]:
        msg = p.outgoing(DEV, kind, b"x", "c-1-2")
        assert (msg.topic, msg.payload, msg.retain, msg.qos) == (topic, b"x", False, 1)
    status = p.outgoing(DEV, profiles.STATUS, b"online")
    assert status.topic == t.status and status.retain
    will = p.will(DEV)
    assert will is not None and (will.topic, will.payload, will.retain) == (t.status, STATUS_OFFLINE, True)
    assert p.subscriptions(DEV) == [t.acks, t.commands]


def test_glucoagent_profile_classifies_by_topic() -> None:
    p = CloudProfile()
    t = DeviceTopics(DEV)
    assert p.classify(DEV, t.acks, b"a") == profiles.Inbound(ACK, b"a")
    assert p.classify(DEV, t.commands, b"c") == profiles.Inbound(COMMAND, b"c")
    other = p.classify(DEV, DeviceTopics("gd-ffffffffffff").commands, b"c")
    assert other.kind == UNKNOWN and "unexpected topic" in other.note and other.reply is None


def test_outgoing_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown outgoing kind"):
        CloudProfile().outgoing(DEV, "acks", b"")


def test_profile_choice_and_its_required_options() -> None:
    assert MqttSection().cloud() == CloudProfile()
    with pytest.raises(ValueError, match=r"needs mqtt\.azure_hub"):
        make_profile("azure", {})
    with pytest.raises(ValueError, match=r"not implemented"):
        make_profile("nimbus")
    assert make_profile("azure", {"azure_hub": "h.azure-devices.net", "proxy": "ignored"}).name == "azure"
