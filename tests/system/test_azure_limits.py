"""Each documented IoT Hub limit provoked once against the fake (testbed/clouds/azure_fake.py): the hub's
refusal as the service refuses, and the agent's side of it: nothing lost, a clear log line.

- a D2C message over 256 KB, a QoS 2 publish, a sixth subscription: the hub closes the connection (a raw
  client with the box's own credentials does what the agent never does: its profile caps each);
- the C2D throttle: the hub refuses acks beyond its send rate; the agent resends what was not acknowledged,
  the backend stores it once, and every reading arrives once.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttSection
from agent.wire import profiles
from agent.wire.azure import MAX_D2C_BYTES, encode_properties
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import device_config


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureSystem]:
    with AzureSystem(tmp_path_factory.mktemp("azure-limits")) as s:
        yield s


class RawDevice:
    """A plain MQTT 3.1.1 client with a box's certificate and the hub's user name: free to break the rules."""

    def __init__(self, hub: AzureSystem, state: Path, device_id: str) -> None:
        self.closed = threading.Event()
        self.connected = threading.Event()
        self.granted: list[int] = []
        self.subacked = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311, clean_session=True)
        ctx = ssl.create_default_context(cafile=str(state / "ca.crt"))
        ctx.load_cert_chain(str(state / "device.crt"), str(state / "device.key"))
        c.tls_set_context(ctx)
        c.username_pw_set(f"{hub.hub}/{device_id}/?api-version=2021-04-12")
        c.on_connect = lambda *_a: self.connected.set()
        c.on_disconnect = lambda *_a: self.closed.set()

        def on_subscribe(_c: object, _u: object, _mid: int, codes: list[object], _p: object) -> None:
            self.granted = [int(getattr(x, "value", x)) for x in codes]  # type: ignore[call-overload]
            self.subacked.set()

        c.on_subscribe = on_subscribe
        c.connect(hub.broker.host, hub.broker.port, keepalive=30)
        c.loop_start()
        assert self.connected.wait(10)
        self.client, self.device_id = c, device_id

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def enrolled(hub: AzureSystem) -> tuple[Path, str]:
    state = hub.device_dir("raw-box")
    return state, hub.enrol(state)


def test_oversize_d2c_closes_the_connection(hub: AzureSystem, enrolled: tuple[Path, str]) -> None:
    state, device_id = enrolled
    raw = RawDevice(hub, state, device_id)
    bag = encode_properties({"kind": "telemetry"})
    raw.client.publish(f"devices/{device_id}/messages/events/{bag}", b"x" * (MAX_D2C_BYTES + 1), qos=1)
    assert raw.closed.wait(10)
    assert any("exceeds 256 KB" in why for dev, why in hub.responder.closed if dev == device_id)
    raw.close()
    # The agent never builds such a message: the profile caps an upload below the limit, properties included.
    limit = MqttSection(profile="azure", azure_hub=hub.hub).cloud().payload_limit(profiles.TELEMETRY)
    assert limit is not None and limit + 512 <= MAX_D2C_BYTES


def test_qos2_publish_closes_and_qos2_subscription_is_granted_qos1(hub: AzureSystem, enrolled: tuple[Path, str]) -> None:
    state, device_id = enrolled
    raw = RawDevice(hub, state, device_id)
    raw.client.subscribe(f"devices/{device_id}/messages/devicebound/#", qos=2)
    assert raw.subacked.wait(10) and raw.granted == [1]
    raw.client.publish(f"devices/{device_id}/messages/events/", b"{}", qos=2)
    assert raw.closed.wait(10)
    raw.close()


def test_a_sixth_subscription_closes_the_connection(hub: AzureSystem, enrolled: tuple[Path, str]) -> None:
    state, device_id = enrolled
    raw = RawDevice(hub, state, device_id)
    allowed = [f"devices/{device_id}/messages/devicebound/#", "$iothub/methods/POST/#", "$iothub/twin/res/#",
               "$iothub/twin/PATCH/properties/desired/#", "$dps/registrations/res/#"]  # fmt: skip
    for t in allowed:
        raw.subacked.clear()
        raw.client.subscribe(t, qos=1)
        assert raw.subacked.wait(10)
    assert not raw.closed.wait(1)
    raw.client.subscribe(f"devices/{device_id}/messages/devicebound/more/#", qos=1)
    assert raw.closed.wait(10)
    assert any("unsupported topic filter" in why or "more than 5" in why for dev, why in hub.responder.closed if dev == device_id)
    raw.close()


def test_c2d_throttle_loses_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    # One C2D send every 4 s: most cumulative acks and time replies are refused with 429.
    with AzureSystem(tmp_path / "throttled", c2d_per_s=0.25, c2d_burst=1) as hub:
        meter = random_records("onetouch-ultra2", 60, seed=41)
        (tmp_path / "m.json").write_text(dumps(meter))
        link = tmp_path / "ttyTHR"
        hub.start_simulator("onetouch-ultra2", link, tmp_path / "m.json", "--baud", "0")
        state = hub.device_dir("throttled-box")
        device_id = hub.enrol(state)
        config = device_config(
            state / "glucoagent.uci", [(str(link), "onetouch-ultra2")],
            mqtt=hub.mqtt_options(ack_timeout_s="3", batch_records="10"),
        )  # fmt: skip
        hub.start_agent(state, config)
        readings = lambda: hub.db.records(device_id=device_id, kind="reading")  # noqa: E731
        log = lambda: (state / "agent.log").read_text()  # noqa: E731
        assert hub.wait_for(lambda: len(readings()) >= 60 and hub.responder.c2d_throttled > 0, 90), log()[-3000:]
        assert hub.wait_for(lambda: "buffer_depth\": 0" in hub.glucoagent(state, "status", "--json", config=config).stdout, 90), log()[-3000:]
        got = sorted((r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in readings())
        assert got == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in meter)
        assert "resending" in log()  # the agent's line for what was not acknowledged in time
        assert any("the hub refused a C2D message to " + device_id in r.getMessage() for r in caplog.records)
