"""The reference cloud's MQTT service: provisioning (backend/provisioning.py), ingest with verification
(backend/ingest.py), signed acks, device status, command results (backend/commands.py).

It logs in as the ``backend`` identity (the only one the broker lets read every
device's telemetry and write their acks and commands). Every record's COSE
signature is checked against a key registered for the device that published it,
records are de-duplicated by (device id, stream, sequence number) in one
transaction, and only then acknowledged with a signed ack.

Roles (``serve --workers N``, backend/workers.py): ``all`` is the one connection of a single-process
cloud; with N workers the ``control`` process keeps provisioning, status and command results, and N
``ingest`` processes share telemetry and health through an MQTT 5 shared subscription.
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
from agent.wire import clocksync, cose, release, telemetry, topics
from agent.wire import provisioning as wire_provisioning
from agent.wire.ack import encode_ack
from backend.clouds.adapter import ACK, CHUNK, COMMAND, PROVISION, TIME_REPLY, CloudAdapter
from backend.db import BackendDb
from backend.ingest import IngestMixin, IngestStats
from backend.mqtt_client import BackendLink, LinkSettings
from backend.provisioning import ProvisioningMixin
from backend.release import ReleaseShelf

log = logging.getLogger(__name__)
CERT_DAYS = 365
# Bytes per message the service decodes: the agent's own cap (mqtt.max_payload, AWS IoT Core's limit).
# Anything larger is counted and dropped before it is parsed.
MAX_PAYLOAD = 131_072
SHARE_GROUP = "$share/ingest/"  # MQTT 5 shared subscription: each message goes to one ingest worker
ROLES = ("all", "control", "ingest")
DRAIN_ON_STOP_S = 1.0  # an ingest worker told to stop handles what is already on its way for this long


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
    release_key: ed25519.Ed25519PrivateKey | None = None  # signs release manifests (docs/updates.md)

    @property
    def release_pub_pem(self) -> bytes | None:
        if self.release_key is None:
            return None
        return self.release_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def command_pub_pem(self) -> bytes:
        return self.command_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class BackendService(ProvisioningMixin, IngestMixin):
    """The backend's one connection: provisioning requests, telemetry and health, status, command results."""

    def __init__(
        self,
        db: BackendDb,
        keys: BackendKeys,
        settings: LinkSettings,
        initial_config: dict[str, Any],
        role: str = "all",
        cloud: CloudAdapter | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown backend role {role!r}")
        if role == "ingest" and not settings.manual_ack:
            raise ValueError("an ingest worker acknowledges only what it stored: it needs manual_ack")
        self.role = role
        self.cloud = cloud or CloudAdapter()  # where the cloud delivers, how it sends (backend/clouds/)
        self.renews_by_enrolment = self.cloud.renews_by_enrolment
        self._acks_due: dict[str, dict[str, list[int]]] = {}  # cumulative acks (cloud.ack_interval_s > 0)
        self._acks_sent: dict[str, float] = {}  # device -> monotonic time of its last ack
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
        self.stats = IngestStats()
        self.releases: ReleaseShelf | None = None  # packages served to update downloads (docs/updates.md)

    def stop(self) -> None:
        self._stop.set()

    def subscriptions(self) -> list[str]:
        control, ingest = self.cloud.control_topics(), self.cloud.ingest_topics()
        if self.role == "control":
            return control
        if self.role == "ingest":
            return [SHARE_GROUP + t for t in ingest]
        return [*control, *ingest]

    def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            # An ingest worker handles each message inside paho's callback, so its PUBACK (manual_ack)
            # follows the commit and the signed ack; the other roles queue and ack on receipt, as before.
            on_message = self._handle_one if self.role == "ingest" else lambda t, p: self._inbox.put((t, p))
            link = BackendLink(self.settings, on_message=on_message)
            self.link = link  # a kept session's messages may arrive before the SUBACK: acks go out on it
            try:
                link.connect()
                granted = link.subscribe(self.subscriptions())
                if any(code >= 0x80 for code in granted):
                    link.close()
                    raise LinkError(f"the broker refused a subscription of {self.subscriptions()}: {granted}")
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
                self._flush_acks()
            self.ready.clear()
            if self.role == "ingest" and link.connected:
                # Leave the share group, handle what is already on its way, and end the kept session:
                # a stopped worker must not go on being dealt its share of messages by the broker.
                link.unsubscribe(self.subscriptions())
                deadline = time.monotonic() + DRAIN_ON_STOP_S
                while time.monotonic() < deadline and link.loop(0.05):
                    pass
                link.disconnect(end_session=True)
                log.info("%s", self.stats.line(self.db.lock_wait_s))
            else:
                link.disconnect()

    def _drain(self) -> None:
        while True:
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle_one(topic, payload)

    def _handle_one(self, topic: str, payload: bytes) -> None:
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

    def send(self, device_id: str, kind: str, payload: bytes, ttl_s: float | None = None) -> None:
        """``payload`` of ``kind`` (adapter ACK, TIME_REPLY, COMMAND, CHUNK) to a box, the way its cloud sends it."""
        msg = self.cloud.to_device(device_id, kind, payload, ttl_s)
        self.publish(msg.topic, msg.payload, retain=msg.retain)

    def _ack(self, device_id: str, acks: dict[str, list[int]]) -> None:
        """Sign and send the ack at once, or (a cloud that throttles messages to a device) add it to the
        device's cumulative ack, sent by ``_flush_acks`` at most every ``cloud.ack_interval_s``."""
        if self.cloud.ack_interval_s <= 0:
            self.send(device_id, ACK, encode_ack(self.keys.command_key, device_id, acks))
            return
        due = self._acks_due.setdefault(device_id, {})
        for stream, seqs in acks.items():
            due.setdefault(stream, []).extend(seqs)
        self._flush_acks()

    def _flush_acks(self) -> None:
        if not self._acks_due:
            return
        now = time.monotonic()
        for device_id in list(self._acks_due):
            if now - self._acks_sent.get(device_id, -1e9) < self.cloud.ack_interval_s:
                continue
            acks = {stream: sorted(set(seqs)) for stream, seqs in self._acks_due.pop(device_id).items()}
            self._acks_sent[device_id] = now
            try:
                self.send(device_id, ACK, encode_ack(self.keys.command_key, device_id, acks))
            except LinkError as exc:  # the records are stored: the box resends them and is acked then
                log.warning("backend: ack to %s not sent: %s", device_id, exc)

    # --- dispatch -----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        if len(payload) > self.max_payload:  # before any decoding: a huge message costs only its count
            self.db.bump("oversize_messages")
            log.warning("message on %s refused unparsed: %d bytes > limit %d", topic, len(payload), self.max_payload)
            return
        msg = self.cloud.incoming(topic, payload)
        if msg is None:
            return
        device_id, leaf, payload = msg.key, msg.kind, msg.payload
        if leaf == PROVISION:
            reply = self.cloud.provision_reply(device_id, wire_provisioning.encode_reply(self.provision(device_id, payload)))
            self.publish(reply.topic, reply.payload)
            return
        if leaf in (topics.TELEMETRY, topics.HEALTH):
            acks = self.ingest(device_id, leaf, payload)
            if acks:
                self._ack(device_id, acks)
        elif leaf == topics.STATUS:
            self.on_status(device_id, payload)
        elif leaf == topics.RESULTS:
            self.on_result(device_id, payload)
        elif leaf == topics.FETCH:
            self.on_fetch(device_id, payload)
        elif leaf == topics.TIME:
            self.on_time_request(device_id, payload)

    def on_fetch(self, device_id: str, payload: bytes) -> None:
        """A box asks for one chunk of a released package; unknown packages get no answer."""
        try:
            req = release.decode_chunk_request(payload)
        except ValueError as exc:
            log.warning("fetch from %s refused: %s", device_id, exc)
            return
        chunk = self.releases.chunk(req) if self.releases is not None else None
        if chunk is None:
            log.warning("fetch from %s: package %s was never released here", device_id, req.sha256.hex()[:16])
            return
        self.send(device_id, CHUNK, release.encode_chunk(chunk))

    def on_time_request(self, device_id: str, payload: bytes) -> None:
        """The cloud's time, signed by the command key and bound to the box's nonce (agent/wire/clocksync.py).
        The broker's ACLs let only the certificate of ``device_id`` publish here, and the answer goes to its acks."""
        try:
            nonce = clocksync.decode_time_request(payload)
        except ValueError as exc:
            log.warning("time request from %s ignored: %s", device_id, exc)
            return
        reply = clocksync.encode_time_reply(self.keys.command_key, device_id, nonce, time.time())
        self.send(device_id, TIME_REPLY, reply)

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
            deliver=lambda dev, payload: self.send(dev, COMMAND, payload),
            revoke=self.keys.revoke,
            revoked=self.keys.revoked,
        )
