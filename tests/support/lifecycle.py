"""Helpers for the system tests of a provisioned box: its own key signs records, its certificate uploads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2

from agent.clock import Clock, ClockQuality, Timestamp
from agent.identity.credentials import load_identity
from agent.wire import cose, telemetry, topics
from backend.pki import ClientCreds
from support.probe import MqttProbe
from testbed.harness import LocalSystem

BACKEND = str(Path(sys.executable).parent / "glucoagent-backend")


def signed(state: Path, seq: int, kind: telemetry.Kind = telemetry.Kind.READING, wall: float | None = None) -> bytes:
    """A record signed with the box's own key, as its agent would sign it (any ``seq``, any ``wall``)."""
    ident = load_identity(state)
    ts = Clock().now()
    if wall is not None:
        ts = Timestamp(wall, ClockQuality.SYNCED, ts.boot_id, ts.monotonic)
    entries: dict[telemetry.Kind, list[dict[int, Any]]] = {
        telemetry.Kind.READING: [{telemetry.N: "glu", telemetry.U: "mg/dL", telemetry.V: 100 + seq % 100}],
        telemetry.Kind.DOSE: [{telemetry.N: "ins:units", telemetry.V: 4.5}],
        telemetry.Kind.ALERT: telemetry.alert_entries("hypo", "glucose 60 mg/dL below 70"),
        telemetry.Kind.HEALTH: telemetry.health_entries({"uptime_s": 5}),
    }
    header = telemetry.Header(ident.device_id, seq, kind, ts)
    payload = telemetry.encode(header, entries[kind])
    return cose.sign1(ident.key, payload, kid=ident.kid, content_type=telemetry.SENML_CBOR_CONTENT_FORMAT)


def device_probe(system: LocalSystem, state: Path) -> MqttProbe:
    ident = load_identity(state)
    creds = ClientCreds(cert=state / "device.crt", key=state / "device.key", ca=state / "ca.crt")
    probe = MqttProbe(creds, system.broker.host, system.broker.port, client_id=ident.device_id)
    assert probe.connect(), f"device {ident.device_id} could not log in"
    return probe


def upload(
    system: LocalSystem,
    state: Path,
    items: list[bytes],
    *,
    leaf: str = topics.TELEMETRY,
    payload: bytes | None = None,
    timeout: float = 15,
) -> dict[str, Any]:
    """Publish a batch as the box and return the backend's verified ack body (TimeoutError: no ack)."""
    ident = load_identity(state)
    dev = topics.DeviceTopics(ident.device_id)
    probe = device_probe(system, state)
    try:
        probe.subscribe(dev.acks)
        probe.publish(f"{topics.PREFIX}/dev/{ident.device_id}/{leaf}", payload or cbor2.dumps(items))
        msg = probe.next_message_on(dev.acks, timeout)
    finally:
        probe.close()
    body = cbor2.loads(cose.verify1(msg.payload, lambda _kid: ident.command_key).payload)
    assert isinstance(body, dict) and body["dev"] == ident.device_id
    return body


def device_id_of(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[-1]
