"""The azure profile's formats, cross-checked against the documentation and the official SDKs' ways
(azure-iot-sdk-python mqtt_topic_iothub.py encodes property bags with urlencode(quote_via=quote);
azure-iot-sdk-c builds the same user name)."""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from agent.wire import azure, profiles
from agent.wire.azure import AzureProfile, decode_properties, encode_properties

DEV = "gd-0123456789ab"
HUB = "clinic-hub.azure-devices.net"


@pytest.fixture
def p() -> AzureProfile:
    return AzureProfile(azure_hub=HUB)


def test_identity_and_session(p: AzureProfile) -> None:
    # [MQTT] ClientId = deviceId; Username "{iotHub-hostname}/{device-id}/?api-version=2021-04-12"
    assert p.client_id(DEV) == DEV
    assert p.username(DEV) == f"{HUB}/{DEV}/?api-version=2021-04-12"
    assert p.protocol("mqttv5") == "mqttv311"
    assert p.keepalive(60) == 60 and p.keepalive(5000) == 1177
    assert not p.status_messages and p.will(DEV) is None
    assert not p.side_connections and p.enrolment == "dps"
    assert p.inflight(4) >= 16  # cumulative acks every few seconds: the window holds several seconds of batches


def test_d2c_topic_and_property_bag_as_the_python_sdk_encodes_it(p: AzureProfile) -> None:
    msg = p.outgoing(DEV, profiles.TELEMETRY, b"\x81", "c-1-50")
    base = f"devices/{DEV}/messages/events/"
    assert msg.topic.startswith(base) and msg.qos == 1 and not msg.retain and msg.payload == b"\x81"
    sdk = urllib.parse.urlencode([("$.mid", "c-1-50"), ("$.ct", "application/cbor")], quote_via=urllib.parse.quote)
    bag = msg.topic[len(base) :]
    assert set(bag.split("&")) == {*sdk.split("&"), "kind=telemetry"}
    assert decode_properties(bag) == {"$.ct": "application/cbor", "$.mid": "c-1-50", "kind": "telemetry"}
    for kind in (profiles.HEALTH, profiles.RESULTS, profiles.TIME):
        assert decode_properties(p.outgoing(DEV, kind, b"").topic[len(base) :])["kind"] == kind
    with pytest.raises(ValueError, match="no 'status'"):
        p.outgoing(DEV, profiles.STATUS, b"online")


def test_payload_limit_leaves_room_for_the_property_bag(p: AzureProfile) -> None:
    limit = p.payload_limit(profiles.TELEMETRY)
    assert limit is not None
    bag = p.outgoing(DEV, profiles.TELEMETRY, b"", "c-" + "9" * 20 + "-" + "9" * 20).topic.split("/events/")[1]
    props = decode_properties(bag)
    assert limit + sum(len(k) + len(v) for k, v in props.items()) <= azure.MAX_D2C_BYTES


def test_subscriptions_and_c2d_classification(p: AzureProfile) -> None:
    assert p.subscriptions(DEV) == [f"devices/{DEV}/messages/devicebound/#", "$iothub/methods/POST/#"]
    c2d = f"devices/{DEV}/messages/devicebound/"
    # [MQTT] the service adds its own properties ($.to, $.mid ...) before ours
    to = urllib.parse.quote(f"/devices/{DEV}/messages/deviceBound", safe="")
    assert p.classify(DEV, f"{c2d}%24.mid=1&%24.to={to}&kind=ack", b"a") == profiles.Inbound(profiles.ACK, b"a")
    assert p.classify(DEV, f"{c2d}kind=time", b"t") == profiles.Inbound(profiles.TIME_REPLY, b"t")
    assert p.classify(DEV, f"{c2d}kind=command", b"c") == profiles.Inbound(profiles.COMMAND, b"c")
    assert p.classify(DEV, c2d, b"c").kind == profiles.COMMAND  # no bag: a command (verified before it runs)
    assert p.classify(DEV, f"{c2d}kind=other", b"").kind == profiles.UNKNOWN
    assert p.classify(DEV, "devices/gd-ffffffffffff/messages/devicebound/kind=ack", b"").kind == profiles.UNKNOWN


def test_direct_method_command_and_its_response(p: AzureProfile) -> None:
    payload = azure.command_method_payload(b"\xd2cose")
    got = p.classify(DEV, "$iothub/methods/POST/command/?$rid=42", payload)
    assert (got.kind, got.payload) == (profiles.COMMAND, b"\xd2cose")
    # [MQTT] the answer: $iothub/methods/res/{status}/?$rid={request id}, JSON body
    assert got.reply is not None and got.reply.topic == "$iothub/methods/res/200/?$rid=42"
    assert json.loads(got.reply.payload) == {"stored": True}
    assert got.reply_refused is not None and got.reply_refused.topic.startswith("$iothub/methods/res/503/")
    bad = p.classify(DEV, "$iothub/methods/POST/command/?$rid=43", b"not json")
    assert bad.kind == profiles.UNKNOWN and bad.reply is not None and "/400/" in bad.reply.topic
    other = p.classify(DEV, "$iothub/methods/POST/reboot/?$rid=44", b"{}")
    assert other.kind == profiles.UNKNOWN and other.reply is not None and "/404/" in other.reply.topic
    assert p.classify(DEV, "$iothub/methods/POST/command/", payload).kind == profiles.UNKNOWN  # no $rid


def test_property_bag_round_trip_and_null_values() -> None:
    props = {"$.mid": "a b/c&d=e", "kind": "ack", "x": ""}
    assert decode_properties(encode_properties(props)) == props
    assert decode_properties("prop1&prop2=&prop3=a%20string") == {"prop1": "", "prop2": "", "prop3": "a string"}


def test_dps_formats() -> None:
    # [DPS] user name; [PYP] register and status topics, response topic with $rid and retry-after
    assert azure.dps_username("0ne0001", DEV, "2019-03-31") == f"0ne0001/registrations/{DEV}/api-version=2019-03-31"
    assert azure.dps_register_topic("7") == "$dps/registrations/PUT/iotdps-register/?$rid=7"
    assert azure.dps_status_topic("8", "5.abc") == "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8&operationId=5.abc"
    r = azure.decode_dps_response("$dps/registrations/res/202/?$rid=7&retry-after=3", b'{"operationId":"5.abc"}')
    assert r == azure.DpsResponse(202, "7", 3.0, {"operationId": "5.abc"})
    assert azure.decode_dps_response(azure.dps_response_topic(200, "9"), b"{}") == azure.DpsResponse(200, "9", None, {})
    assert azure.decode_dps_response("devices/x", b"") is None
    body = json.loads(azure.encode_dps_register(DEV, b"\x30\x01", b"\xa1cbor"))
    assert body["registrationId"] == DEV and base64.b64decode(body["csr"]) == b"\x30\x01"
    assert azure.payload_bytes(body["payload"]) == b"\xa1cbor"
    with pytest.raises(ValueError):
        azure.payload_bytes({"other": "x"})


def test_hub_name_checked() -> None:
    with pytest.raises(ValueError, match="azure_hub"):
        AzureProfile(azure_hub="not a host")


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("$dps/registrations/res/200/?$rid=9", b"[]"),  # a body that is no JSON object
        ("$dps/registrations/res/200/?$rid=9", b"null"),
        ("$dps/registrations/res/202/?$rid=9&retry-after=nan", b"{}"),  # a wait that is no wait
        ("$dps/registrations/res/202/?$rid=9&retry-after=-5", b"{}"),
        ("$dps/registrations/res/2x0/?$rid=9", b"{}"),
    ],
)
def test_a_malformed_dps_response_is_a_value_error(topic: str, payload: bytes) -> None:
    # dps.py logs a ValueError and waits for a good answer; anything else would reach the technician as a
    # traceback (a list has no .get) or poll DPS in a tight loop
    with pytest.raises(ValueError, match="malformed DPS response"):
        azure.decode_dps_response(topic, payload)
