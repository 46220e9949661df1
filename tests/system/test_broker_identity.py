"""Identity bound at the broker (issue 12; docs/security.md "Client ids"): real mosquitto, real TLS.

The probes of the outside review: a certificate connecting with another identity's client id
used to make mosquitto close the real owner's connection and, with a clean start, drop its
session and the command queued in it. Now the auth plugin refuses such a CONNECT before
mosquitto looks for a client with that id, so the owner is never touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.wire import topics
from backend.broker import Broker
from backend.broker_config import BROKER_USER, MAX_PACKET_SIZE
from backend.pki import ClientCreds, FleetPki
from testbed.client_certs import issue_client_cert

NOT_AUTHORIZED = 0x87
BAD_AUTHENTICATION_METHOD = 0x8C
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
Probe = Any  # conftest.MqttProbe
ProbeFactory = Callable[..., Probe]
CredsFactory = Callable[..., ClientCreds]


def _uid() -> str:
    return f"gd-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def backend(mqtt_probe: ProbeFactory, pki: FleetPki) -> Probe:
    probe = mqtt_probe(pki.backend)
    assert probe.connect()
    return probe


def _offline_with_queued_command(
    creds: ClientCreds, dev_id: str, mqtt_probe: ProbeFactory, backend: Probe, broker: Broker
) -> bytes:
    """The device has a persistent session, went offline, and the cloud queued a command for it."""
    device = mqtt_probe(creds, client_id=dev_id, broker=broker)
    assert device.connect(clean_start=False, session_expiry_s=3600)
    assert [c.value for c in device.subscribe(topics.DeviceTopics(dev_id).commands)] == [1]
    device.close()
    command = b"queued while offline " + uuid.uuid4().hex.encode()
    assert not backend.publish(topics.DeviceTopics(dev_id).commands, command).is_failure
    return command


def _mosquitto_sub(creds: ClientCreds, broker: Broker, client_id: str) -> subprocess.CompletedProcess[str]:
    """The reviewer's probe, verbatim: mosquitto_sub with a fleet certificate and someone else's client id."""
    assert MOSQUITTO_SUB, "mosquitto_sub missing: `make setup` installs mosquitto-clients"
    cmd = [MOSQUITTO_SUB, "-V", "mqttv5", "--cafile", str(creds.ca), "--cert", str(creds.cert), "--key", str(creds.key)]
    cmd += ["-h", "localhost", "-p", str(broker.port), "-i", client_id, "-t", "gluco/v1/prov/none/response"]
    cmd += ["-C", "1", "-W", "5"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _still_connected_and_served(device: Probe, backend: Probe, dev_id: str) -> None:
    assert device.disconnected is None
    live = b"live command " + uuid.uuid4().hex.encode()
    assert not backend.publish(topics.DeviceTopics(dev_id).commands, live).is_failure
    assert device.next_message_on(topics.DeviceTopics(dev_id).commands).payload == live


def test_claim_certificate_cannot_take_a_device_id(
    broker: Broker, pki: FleetPki, device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend: Probe
) -> None:
    dev_id = _uid()
    creds = device_creds(dev_id)
    queued = _offline_with_queued_command(creds, dev_id, mqtt_probe, backend, broker)

    offline_attempt = _mosquitto_sub(pki.claim, broker, dev_id)  # while the device is offline: its session
    assert offline_attempt.returncode == NOT_AUTHORIZED, offline_attempt  # would be wiped by a clean start
    assert "not authori" in (offline_attempt.stdout + offline_attempt.stderr).lower()

    device = mqtt_probe(creds, client_id=dev_id)
    assert device.connect(clean_start=False, session_expiry_s=3600)
    assert device.next_message_on(topics.DeviceTopics(dev_id).commands).payload == queued

    online_attempt = _mosquitto_sub(pki.claim, broker, dev_id)  # while it is online: it would be kicked
    assert online_attempt.returncode == NOT_AUTHORIZED, online_attempt
    _still_connected_and_served(device, backend, dev_id)
    assert f"refused client id {dev_id} for certificate claim" in broker.log_text()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_another_devices_certificate_cannot_take_a_device_id(
    protocol: int, broker: Broker, device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend: Probe
) -> None:
    victim_id, attacker_id = _uid(), _uid()
    victim_creds, attacker_creds = device_creds(victim_id), device_creds(attacker_id)
    queued = _offline_with_queued_command(victim_creds, victim_id, mqtt_probe, backend, broker)

    attacker = mqtt_probe(attacker_creds, client_id=victim_id, protocol=protocol)
    assert attacker.connect() is False
    assert attacker.connack is not None and attacker.connack.value == NOT_AUTHORIZED

    victim = mqtt_probe(victim_creds, client_id=victim_id)
    assert victim.connect(clean_start=False, session_expiry_s=3600)
    assert victim.next_message_on(topics.DeviceTopics(victim_id).commands).payload == queued

    attacker = mqtt_probe(attacker_creds, client_id=victim_id, protocol=protocol)
    assert attacker.connect() is False
    _still_connected_and_served(victim, backend, victim_id)


# (certificate CN, client id, accepted?); "{dev}" is a fresh device id
CLIENT_ID_RULES = [
    ("{dev}", "{dev}", True),
    ("{dev}", "{dev}-renew", True),  # agent/identity/renewal.py: the new certificate's trial login
    ("{dev}", "{dev}-check", True),  # agent/status.py
    ("{dev}", "{dev}-other", False),
    ("{dev}", "{dev}x", False),
    ("{dev}", "gd-someoneelse", False),
    ("{dev}", "claim-{dev}", False),
    ("{dev}", "backend-{dev}", False),
    ("claim", "claim-0123456789abcdef", True),
    ("claim", "{dev}", False),
    ("claim", "backend-1", False),
    ("claim", "claim", False),
    ("backend", "backend-tap", True),
    ("backend", "{dev}", False),
    ("backend", "claim-1", False),
    # CNs no device may have, whatever client id they bring: they would collide with the rules above
    ("claim-{dev}", "claim-{dev}", False),
    ("backend-{dev}", "backend-{dev}", False),
    ("{dev}-renew", "{dev}-renew", False),
    ("GD-UPPER", "GD-UPPER", False),
    ("gd-a/b", "gd-a/b", False),
]


@pytest.mark.parametrize(("cn", "client_id", "accepted"), CLIENT_ID_RULES)
def test_client_id_must_match_the_certificate(
    cn: str, client_id: str, accepted: bool, pki: FleetPki, mqtt_probe: ProbeFactory
) -> None:
    dev = _uid()
    cn, client_id = cn.format(dev=dev), client_id.format(dev=dev)
    creds = {"claim": pki.claim, "backend": pki.backend}.get(cn) or issue_client_cert(pki, cn)
    probe = mqtt_probe(creds, client_id=client_id)
    assert probe.connect() is accepted, (cn, client_id)
    if not accepted:
        assert probe.connack is not None and probe.connack.value == NOT_AUTHORIZED


def test_user_name_sent_by_the_client_is_ignored(
    device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend: Probe
) -> None:
    """The user name is the certificate CN, whatever CONNECT carries: 'backend' grants a device nothing."""
    dev_id, victim = _uid(), topics.DeviceTopics(_uid())
    device = mqtt_probe(device_creds(dev_id), client_id=dev_id)
    device.client.username_pw_set("backend", "anything")
    assert device.connect()
    assert device.publish(victim.telemetry, b"as someone else").value == NOT_AUTHORIZED
    assert not device.publish(topics.DeviceTopics(dev_id).telemetry, b"as myself").is_failure


def test_extended_authentication_cannot_bypass_the_binding(
    device_creds: CredsFactory, mqtt_probe: ProbeFactory
) -> None:
    """MQTT 5 enhanced auth skips basic auth in mosquitto; no plugin answers it, so the CONNECT is refused."""
    dev_id = _uid()
    probe = mqtt_probe(device_creds(dev_id), client_id=_uid())
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "SCRAM-SHA-256"
    probe.client.connect(probe.host, probe.port, keepalive=30, clean_start=True, properties=props)
    probe.client.loop_start()
    probe._looping = True
    probe._wait(lambda: probe.connack is not None, 5.0, "CONNACK")
    assert probe.connack.value == BAD_AUTHENTICATION_METHOD


def test_reload_keeps_offline_sessions_and_online_clients(
    fresh_broker: Callable[..., Broker], pki: FleetPki, device_creds: CredsFactory, mqtt_probe: ProbeFactory
) -> None:
    """On SIGHUP mosquitto re-authenticates every client it knows, offline sessions too (they have no certificate)."""
    broker = fresh_broker()
    backend = mqtt_probe(pki.backend, broker=broker)
    assert backend.connect()
    dev_id, online_id = _uid(), _uid()
    creds = device_creds(dev_id)
    queued = _offline_with_queued_command(creds, dev_id, mqtt_probe, backend, broker)
    online = mqtt_probe(device_creds(online_id), client_id=online_id, broker=broker)
    assert online.connect()
    assert [c.value for c in online.subscribe(topics.DeviceTopics(online_id).commands)] == [1]

    broker.reload_crl()

    _still_connected_and_served(online, backend, online_id)
    device = mqtt_probe(creds, client_id=dev_id, broker=broker)
    assert device.connect(clean_start=False, session_expiry_s=3600)
    assert device.next_message_on(topics.DeviceTopics(dev_id).commands).payload == queued


def test_broker_refuses_a_packet_above_the_agents_limit(
    broker: Broker, device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend: Probe
) -> None:
    """A 16 MiB publish closes the sender's connection and reaches nobody; the agent's largest batch passes."""
    dev_id = _uid()
    t = topics.DeviceTopics(dev_id)
    creds = device_creds(dev_id)
    tap = backend
    assert not tap.subscribe(t.telemetry)[0].is_failure

    device = mqtt_probe(creds, client_id=dev_id)
    assert device.connect()
    largest = b"\x01" * 131_072  # mqtt.max_payload: the agent never sends more
    assert not device.publish(t.telemetry, largest).is_failure
    assert tap.next_message_on(t.telemetry).payload == largest

    with pytest.raises(ConnectionError):
        device.publish(t.telemetry, b"\x02" * (16 << 20), timeout=30)
    assert "oversize packet" in broker.log_text() or "exceeded" in broker.log_text()

    again = mqtt_probe(creds, client_id=dev_id)
    assert again.connect()
    sentinel = b"after the oversize one"
    assert not again.publish(t.telemetry, sentinel).is_failure
    assert tap.next_message_on(t.telemetry).payload == sentinel  # nothing of 16 MiB arrived before it
    assert MAX_PACKET_SIZE == 131_072 + 1024


def test_broker_runs_as_its_own_user_when_started_as_root(broker: Broker) -> None:
    assert broker.pid is not None
    uid = os.stat(f"/proc/{broker.pid}").st_uid
    if os.geteuid() == 0:
        assert uid == pwd.getpwnam(BROKER_USER).pw_uid != 0
    else:
        assert uid == os.geteuid()
    key = broker.run_dir / "tls" / "server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.stat().st_uid == uid  # readable by the broker (it re-reads it on SIGHUP), by nobody else
    assert broker.run_dir.stat().st_mode & 0o777 == 0o700
    assert (broker.pki.directory / "ca.key").stat().st_mode & 0o777 == 0o600  # the CA key stays root's alone
