"""The reference cloud behind Azure IoT Hub's bridge (backend/clouds/azure.py): routed events in, C2D out,
the DPS custom allocation webhook."""

from __future__ import annotations

import base64
import json

import cbor2

from agent.wire.azure import decode_properties, encode_properties
from agent.wire.provisioning import encode_reply, refusal
from backend.clouds.adapter import ACK, COMMAND, PROVISION, RESULTS, TELEMETRY, TIME_REPLY, Delivered, adapter_for
from backend.clouds.azure import AzureAdapter, events_topic

DEV = "gd-0123456789ab"


def test_routed_events_in() -> None:
    a = adapter_for("azure")
    assert isinstance(a, AzureAdapter) and a.ack_interval_s > 0
    bag = encode_properties({"$.ct": "application/cbor", "kind": "telemetry"})
    assert a.incoming(events_topic("ingest", DEV, bag), b"b") == Delivered(TELEMETRY, DEV, b"b")
    assert a.incoming(events_topic("control", DEV, "kind=results"), b"r") == Delivered(RESULTS, DEV, b"r")
    assert a.incoming(events_topic("control", DEV, bag), b"b") is None  # telemetry on the wrong route
    assert a.incoming(events_topic("ingest", DEV, "kind=status"), b"") is None
    assert a.incoming("gluco/v1/dev/x/telemetry", b"") is None


def test_c2d_out_with_kind_and_ttl() -> None:
    a = adapter_for("azure")
    for kind, wire in ((ACK, "ack"), (TIME_REPLY, "time"), (COMMAND, "command")):
        msg = a.to_device(DEV, kind, b"p", ttl_s=30 if kind == COMMAND else None)
        head, _, bag = msg.topic.rpartition("/")
        assert head == f"azure-bridge/c2d/{DEV}"
        props = decode_properties(bag)
        assert props["kind"] == wire and props["$.mid"] and props["ttl"] == ("30" if kind == COMMAND else "3600")
    assert a.results_topic(DEV) == f"azure-bridge/events/control/{DEV}/#"


def test_dps_webhook_round_trip() -> None:
    a = AzureAdapter()
    request = cbor2.dumps({"v": 1, "req": "r" * 12})
    doc = {"deviceRuntimeContext": {"registrationId": DEV, "payload": {"glucoagent": base64.b64encode(request).decode()}},
           "linkedHubs": ["hub.azure-devices.net"]}  # fmt: skip
    got = a.incoming("azure-bridge/dps/allocate/5.op", json.dumps(doc).encode())
    assert got == Delivered(PROVISION, "r" * 12, request)
    ok = encode_reply({"ok": True, "device_id": DEV})
    answer = a.provision_reply("r" * 12, ok)
    assert answer.topic == "azure-bridge/dps/allocation/5.op"
    body = json.loads(answer.payload)
    assert body["status"] == 200 and body["iotHubHostName"] == "hub.azure-devices.net"
    assert base64.b64decode(body["payload"]["glucoagent"]) == ok
    a.incoming("azure-bridge/dps/allocate/5.op2", json.dumps(doc).encode())
    refused = json.loads(a.provision_reply("r" * 12, encode_reply(refusal("token_used", "used"))).payload)
    assert refused == {"status": 400, "message": "token_used: used"}
    a.incoming("azure-bridge/dps/allocate/5.op3", json.dumps(doc).encode())
    other = json.loads(a.provision_reply("r" * 12, encode_reply({"ok": True, "device_id": "gd-ffffffffffff"})).payload)
    assert other["status"] == 400 and other["message"].startswith("bad_registration:")
    assert a.incoming("azure-bridge/dps/allocate/5.bad", b"{}") is None
