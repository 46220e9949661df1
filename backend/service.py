"""The reference cloud's MQTT service: provisioning (backend/provisioning.py), ingest with verification
(backend/ingest.py), signed acks, device status, command results (backend/commands.py).

It logs in as the ``backend`` identity (the only one the broker lets read every
device's telemetry and write their acks and commands). Every record's COSE
signature is checked against a key registered for the device that published it,
records are de-duplicated by (device id, stream, sequence number) in one
transaction, and only then acknowledged with a signed ack.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import GlucoagentError, LinkError
from agent.wire import clocksync, cose, telemetry, topics
from agent.wire import provisioning as wire_provisioning
from agent.wire.ack import encode_ack
from backend.db import BackendDb
from backend.ingest import IngestMixin
from backend.mqtt_client import BackendLink, LinkSettings
from backend.provisioning import ProvisioningMixin

log = logging.getLogger(__name__)
CERT_DAYS = 365
# Bytes per message the service decodes: the agent's own cap (mqtt.max_payload, AWS IoT Core's limit).
# Anything larger is counted and dropped before it is parsed.
MAX_PAYLOAD = 131_072


def _no_revocation(serials: Sequence[int]) -> None:
    log.warning("no CA to revoke certificates %s with: they stay valid until they expire", list(serials))


@dataclasses.dataclass(frozen=True, slots=True)
class BackendKeys:
    ca_pem: bytes
    sign_csr: Callable[[bytes, str], bytes]  # (csr pem, device id) -> device certificate pem
    command_key: ed25519.Ed25519PrivateKey
    # Certificate lifecycle (backend/home.py wires the fleet CA): revoke serials, rewrite the CRL and
    # have the broker reload it; and the serials revoked so far.
    revoke: Callable[[Sequence[int]], None] = _no_revocation
    revoked: Callable[[], frozenset[int]] = frozenset

    @property
    def command_pub_pem(self) -> bytes:
        return self.command_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class BackendService(ProvisioningMixin, IngestMixin):
    """The backend's one connection: provisioning requests, telemetry and health, status, command results."""

    def __init__(
        self, db: BackendDb, keys: BackendKeys, settings: LinkSettings, initial_config: dict[str, Any]
    ) -> None:
        self.db = db
        self.keys = keys
        self.settings = settings
        self.initial_config = initial_config
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self.link: BackendLink | None = None
        self.ready = threading.Event()
        self._keys: dict[tuple[str, bytes], cose.PublicKey] = {}
        self.on_record: Callable[[str, telemetry.Record], None] | None = None
        self.max_payload = MAX_PAYLOAD

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            link = BackendLink(self.settings, on_message=lambda t, p: self._inbox.put((t, p)))
            try:
                link.connect()
                link.subscribe(
                    [
                        topics.ALL_PROVISION_REQUESTS,
                        topics.ALL_TELEMETRY,
                        topics.ALL_HEALTH,
                        topics.ALL_STATUS,
                        topics.ALL_RESULTS,
                        topics.ALL_TIME,
                    ]
                )
            except GlucoagentError as exc:
                log.warning("backend: %s; retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            self.link = link
            self.ready.set()
            log.info("backend: connected to %s:%d", self.settings.host, self.settings.port)
            while not self._stop.is_set() and link.loop(0.05):
                self._drain()
            self.ready.clear()
            link.disconnect()

    def _drain(self) -> None:
        while True:
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self.handle(topic, payload)
            except (GlucoagentError, LinkError) as exc:
                log.warning("backend: message on %s not handled: %s", topic, exc)
            except Exception:
                log.exception("backend: message on %s crashed its handler", topic)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self.link is None:
            raise LinkError("backend not connected")
        self.link.publish(topic, payload, retain=retain)

    # --- dispatch -----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        if len(payload) > self.max_payload:  # before any decoding: a huge message costs only its count
            self.db.bump("oversize_messages")
            log.warning("message on %s refused unparsed: %d bytes > limit %d", topic, len(payload), self.max_payload)
            return
        parts = topic.split("/")
        if topic.startswith(f"{topics.PREFIX}/prov/") and parts[-1] == "request":
            self.publish(topics.provision_response(parts[-2]), wire_provisioning.encode_reply(self.provision(parts[-2], payload)))
            return
        device_id = topics.device_of(topic)
        if device_id is None:
            return
        leaf = parts[-1]
        if leaf in (topics.TELEMETRY, topics.HEALTH):
            acks = self.ingest(device_id, leaf, payload)
            if acks:
                self.publish(topics.DeviceTopics(device_id).acks, encode_ack(self.keys.command_key, device_id, acks))
        elif leaf == topics.STATUS:
            self.on_status(device_id, payload)
        elif leaf == topics.RESULTS:
            self.on_result(device_id, payload)
        elif leaf == topics.TIME:
            self.on_time_request(device_id, payload)

    def on_time_request(self, device_id: str, payload: bytes) -> None:
        """The cloud's time, signed by the command key and bound to the box's nonce (agent/wire/clocksync.py).
        The broker's ACLs let only the certificate of ``device_id`` publish here, and the answer goes to its acks."""
        try:
            nonce = clocksync.decode_time_request(payload)
        except ValueError as exc:
            log.warning("time request from %s ignored: %s", device_id, exc)
            return
        reply = clocksync.encode_time_reply(self.keys.command_key, device_id, nonce, time.time())
        self.publish(topics.DeviceTopics(device_id).acks, reply)

    def on_status(self, device_id: str, payload: bytes) -> None:
        self.db.set_status(device_id, payload.decode("utf-8", "replace")[:32], time.time())

    def on_result(self, device_id: str, payload: bytes) -> None:
        """Verify against the device's keys, store by command id, answer a renewal's CSR (backend/commands.py)."""
        from backend import commands

        commands.on_result(
            self.db,
            device_id,
            payload,
            sign_csr=self.keys.sign_csr,
            ca_pem=self.keys.ca_pem,
            command_key=self.keys.command_key,
            publish=self.publish,
            revoke=self.keys.revoke,
            revoked=self.keys.revoked,
        )
