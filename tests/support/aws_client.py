"""A plain paho MQTT 5 client for the fake AWS IoT Core, shaped like the AWS SDK samples (tests only)."""

from __future__ import annotations

import queue
import secrets
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.identity.credentials import build_csr, key_pem
from agent.wire import aws
from backend.mqtt_client import tls_context
from backend.pki import ClientCreds


class AwsTestClient:
    """Connects through the SNI gate; collects messages, PUBACK reason codes and the disconnect reason."""

    def __init__(self, creds: ClientCreds, client_id: str, port: int, *, host: str = "localhost") -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.disconnected: ReasonCode | None = None
        self.connack: Any = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(tls_context(creds))
        self.client.on_message = lambda _c, _u, m: self.inbox.put((m.topic, bytes(m.payload)))
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        self.client.on_connect = lambda _c, _u, _f, rc, props: setattr(self, "connack", (rc, props))
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: setattr(self, "disconnected", rc)
        self.client.connect(host, port, keepalive=60, clean_start=True)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while self.connack is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.connack is not None and not self.connack[0].is_failure, self.connack

    def subscribe(self, *filters: str, qos: int = 1) -> None:
        done: list[Any] = []
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: done.append(codes)
        self.client.subscribe([(f, qos) for f in filters])
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.02)
        assert done, "no SUBACK"
        self.granted = [c.value for c in done[0]]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        return self.client.publish(topic, payload, qos=qos).mid

    def puback(self, mid: int, timeout: float = 10) -> int | None:
        deadline = time.monotonic() + timeout
        while mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pubacks.get(mid)

    def expect(self, topic: str, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got, payload = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if got == topic:
                return payload
        raise AssertionError(f"nothing on {topic} within {timeout}s")

    def nothing_on(self, prefix: str, wait: float = 1.0) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                got, _ = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if got.startswith(prefix):
                return False
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def provision_thing(
    claim: ClientCreds, port: int, template: str, parameters: dict[str, str], state: Path
) -> tuple[ClientCreds | None, bytes]:
    """The fleet-provisioning exchange as the SDK samples run it; (device creds, last reply payload)."""
    key = ec.generate_private_key(ec.SECP256R1())
    client = AwsTestClient(claim, f"claim-{secrets.token_hex(6)}", port)
    try:
        provision = aws.provision_topic(template)
        client.subscribe(f"{aws.CREATE_FROM_CSR}/+", f"{provision}/+")
        client.publish(aws.CREATE_FROM_CSR, aws.encode_create_from_csr(build_csr(key, "serial-1")))
        created = aws.decode_certificate_created(client.expect(aws.accepted(aws.CREATE_FROM_CSR)))
        client.publish(provision, aws.encode_register_thing(created.ownership_token, parameters))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                topic, payload = client.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if topic == aws.rejected(provision):
                return None, payload
            if topic == aws.accepted(provision):
                state.mkdir(parents=True, exist_ok=True)
                (state / "device.key").write_bytes(key_pem(key))
                (state / "device.crt").write_bytes(created.certificate_pem)
                return ClientCreds(state / "device.crt", state / "device.key", claim.ca), payload
        raise AssertionError("no answer to RegisterThing")
    finally:
        client.close()


def tls_hello_without_sni(port: int) -> bool:
    """True when the endpoint lets a ClientHello without SNI through to a finished handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=None):
                return True
        except (ssl.SSLError, OSError):
            return False
