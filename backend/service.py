"""The reference cloud's MQTT service: provisioning, ingest with verification, acks.

It logs in as the ``backend`` identity (the only one the broker lets read every
device's telemetry and write their acks and commands). Every record's COSE
signature is checked against a key registered for the device that published it,
records are de-duplicated by (device id, stream, sequence number) in one
transaction, and only then acknowledged with a signed ack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.errors import GlucoagentError, LinkError, SignatureError
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.wire import cose, telemetry, topics
from agent.wire.renewal import RECOVER_KEY
from backend.db import INT64_MAX, BackendDb, token_hash
from backend.pki import PkiError

log = logging.getLogger(__name__)
MAX_BATCH = 1000
CERT_DAYS = 365
# Bytes per message the service decodes: the agent's own cap (mqtt.max_payload, AWS IoT Core's limit).
# Anything larger is counted and dropped before it is parsed.
MAX_PAYLOAD = 131_072
# Refusal codes a box maps to its own exit codes (agent/provisioning.py).
BOUND_TO_OTHER_PATIENT = "bound_to_other_patient"
UNSUPPORTED_KEY = "unsupported_key"
# Re-enrolment over the claim path is for a certificate that has expired; this much clock difference
# between box and cloud is allowed (the box decides by its own clock that it has expired).
RECOVERY_SKEW_S = 86_400.0


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


def device_id_for(public_key: cose.PublicKey) -> str:
    """Device ids derive from the device key: a re-run of provisioning maps to the same id."""
    return "gd-" + cose.key_id(public_key)[:6].hex()


def sign_ack(command_key: ed25519.Ed25519PrivateKey, device_id: str, acks: dict[str, list[int]]) -> bytes:
    return cose.sign1(command_key, cbor2.dumps({"dev": device_id, **acks}, canonical=True))


class BackendService:
    def __init__(
        self, db: BackendDb, keys: BackendKeys, settings: LinkSettings, initial_config: dict[str, Any]
    ) -> None:
        self.db = db
        self.keys = keys
        self.settings = settings
        self.initial_config = initial_config
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self.link: MqttLink | None = None
        self.ready = threading.Event()
        self._keys: dict[tuple[str, bytes], cose.PublicKey] = {}
        self.on_record: Callable[[str, telemetry.Record], None] | None = None
        self.max_payload = MAX_PAYLOAD

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            link = MqttLink(self.settings, on_message=lambda t, p: self._inbox.put((t, p)))
            try:
                link.connect()
                link.subscribe(
                    [
                        topics.ALL_PROVISION_REQUESTS,
                        topics.ALL_TELEMETRY,
                        topics.ALL_HEALTH,
                        topics.ALL_STATUS,
                        topics.ALL_RESULTS,
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
            self.publish(topics.provision_response(parts[-2]), cbor2.dumps(self.provision(parts[-2], payload)))
            return
        device_id = topics.device_of(topic)
        if device_id is None:
            return
        leaf = parts[-1]
        if leaf in (topics.TELEMETRY, topics.HEALTH):
            acks = self.ingest(device_id, leaf, payload)
            if acks:
                self.publish(topics.DeviceTopics(device_id).acks, sign_ack(self.keys.command_key, device_id, acks))
        elif leaf == topics.STATUS:
            self.on_status(device_id, payload)
        elif leaf == topics.RESULTS:
            self.on_result(device_id, payload)

    # --- provisioning -----------------------------------------------------------------------
    def provision(self, request_id: str, payload: bytes) -> dict[str, Any]:
        def refuse(code: str, message: str) -> dict[str, Any]:
            log.warning("provisioning %s refused: %s (%s)", request_id, code, message)
            self.db.bump(f"provision_{code}")
            return {"ok": False, "code": code, "message": message}

        try:
            req = cbor2.loads(payload)
        except (cbor2.CBORDecodeError, ValueError, TypeError):
            return refuse("bad_request", "request is not CBOR")
        if not isinstance(req, dict) or req.get("req") != request_id:
            return refuse("bad_request", "request id does not match its topic")
        if RECOVER_KEY in req:
            return self.recover(request_id, req[RECOVER_KEY], refuse)
        token, patient, csr_pem, hw = req.get("token"), req.get("patient"), req.get("csr"), req.get("hw", {})
        if not (isinstance(token, str) and isinstance(patient, str) and isinstance(csr_pem, bytes) and patient):
            return refuse("bad_request", "token, patient and csr are required")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            if not csr.is_signature_valid:
                return refuse("bad_csr", "CSR signature does not verify")
            public_key = csr.public_key()
        except ValueError as exc:
            return refuse("bad_csr", f"unreadable CSR: {exc}")
        if not (
            isinstance(public_key, ed25519.Ed25519PublicKey)
            or (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1))
        ):
            kind = getattr(getattr(public_key, "curve", None), "name", None) or type(public_key).__name__
            return refuse(UNSUPPORTED_KEY, f"device key {kind} is not supported: use Ed25519 or EC P-256")
        device_id = device_id_for(public_key)
        hw_serial = str(hw.get("serial", "")) if isinstance(hw, dict) else ""
        now = time.time()
        kid = cose.key_id(public_key)
        cert_pem = b""
        with self.db.tx() as db:
            refusal = self._check_binding(db, device_id, patient)
            refusal = refusal or self._check_token(db, token, patient, device_id, now)
            if refusal is None:
                try:
                    cert_pem = self.keys.sign_csr(csr_pem, device_id)
                except PkiError as exc:  # answered like any refusal: the box must not wait for a timeout
                    refusal = ("bad_csr", str(exc))
            if refusal is None:
                db.execute(
                    "UPDATE tokens SET used_at = coalesce(used_at, ?), device_id = ? WHERE token_hash = ?",
                    (now, device_id, token_hash(token)),
                )
                # A device's patient is never re-pointed here: _check_binding refused a different one.
                db.execute(
                    "INSERT INTO devices (device_id, patient_ref, hardware_serial, created_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(device_id) DO NOTHING",
                    (device_id, patient, hw_serial, now),
                )
                if BackendDb.open_binding(db, device_id) is None:
                    db.execute(
                        "INSERT INTO bindings (device_id, patient_ref, valid_from) VALUES (?, ?, ?)",
                        (device_id, patient, now),
                    )
                db.execute(
                    "INSERT INTO device_keys (kid, device_id, cert_pem, added_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(kid) DO UPDATE SET cert_pem = excluded.cert_pem",
                    (kid, device_id, cert_pem, now),
                )
        if refusal is not None:  # counted after the transaction: the counter opens its own
            return refuse(*refusal)
        log.info("provisioned %s (hardware %s)", device_id, hw_serial)
        self.db.bump("provisioned")
        return {
            "ok": True,
            "device_id": device_id,
            "cert": cert_pem + self.keys.ca_pem,
            "ca": self.keys.ca_pem,
            "command_key": self.keys.command_pub_pem,
            "config": self.initial_config,
        }

    def recover(self, request_id: str, signed: object, refuse: Callable[[str, str], dict[str, Any]]) -> dict[str, Any]:
        """Re-enrolment of a box whose certificate expired (agent/renewal.py ``recover``): no token, but the
        request is signed with the device's registered key; the new certificate keeps the device id,
        and with it the patient binding, and the old key stays registered for readings signed with it."""
        from backend.commands import key_in_good_standing

        if not isinstance(signed, bytes):
            return refuse("bad_request", "recover must be a COSE_Sign1")
        try:
            body = cbor2.loads(cose.parse_sign1(signed)[3])  # unverified: only to learn which device it claims
            device_id = body["dev"] if isinstance(body, dict) else None
            if not isinstance(device_id, str) or not topics.DEVICE_ID_RE.match(device_id):
                return refuse("bad_request", "recover names no valid device")
            seen: list[bytes] = []
            body = cbor2.loads(cose.verify1(signed, self._key_for(device_id, seen)).payload)
        except (SignatureError, cbor2.CBORDecodeError, ValueError, TypeError, KeyError):
            return refuse("bad_signature", "the request is not signed with a key registered for that device")
        csr_pem = body.get("csr") if isinstance(body, dict) else None
        if not isinstance(csr_pem, bytes) or body.get("req") != request_id:
            return refuse("bad_request", "signed request id or CSR missing")
        why = key_in_good_standing(self.db, device_id, seen[-1], self.keys.revoked())
        if why is not None:
            return refuse("not_recoverable", why)
        rows = self.db.query("SELECT cert_pem FROM device_keys WHERE kid = ?", (seen[-1],))
        left = x509.load_pem_x509_certificate(rows[0][0]).not_valid_after_utc.timestamp() - time.time()
        if left > RECOVERY_SKEW_S:
            return refuse("not_expired", f"the certificate is valid for {left / 86_400:.1f} more days: renew it over "
                          "the device's own topics")  # fmt: skip
        try:
            public_key = x509.load_pem_x509_csr(csr_pem).public_key()
            if not isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
                return refuse("bad_csr", "device key must be Ed25519 or EC P-256")
            cert_pem = self.keys.sign_csr(csr_pem, device_id)  # checks the CSR's own signature
        except (ValueError, UnsupportedAlgorithm, GlucoagentError) as exc:
            return refuse("bad_csr", f"CSR refused: {exc}")
        with self.db.tx() as db:
            db.execute(
                "INSERT INTO device_keys (kid, device_id, cert_pem, added_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(kid) DO UPDATE SET cert_pem = excluded.cert_pem",
                (cose.key_id(public_key), device_id, cert_pem, time.time()),
            )
        log.info("%s re-enrolled over the claim path (certificate expired %.1f days ago)", device_id, -left / 86_400)
        self.db.bump("recovered")
        return {"ok": True, "device_id": device_id, "cert": cert_pem + self.keys.ca_pem}

    @staticmethod
    def _check_binding(db: Any, device_id: str, patient: str) -> tuple[str, str] | None:
        """A device bound to one patient is never enrolled for another (its buffered readings are P1's)."""
        bound = BackendDb.open_binding(db, device_id)
        if bound is not None and bound[1] != patient:
            return (
                BOUND_TO_OTHER_PATIENT,
                f"device {device_id} is bound to another patient; deprovision the box first "
                "(its unsent readings delivered or discarded), then enrol it again",
            )
        return None

    @staticmethod
    def _check_token(db: Any, token: str, patient: str, device_id: str, now: float) -> tuple[str, str] | None:
        """(code, message) when the token may not enrol this device; None when it may."""
        row = db.execute(
            "SELECT patient_ref, expires_at, used_at, device_id FROM tokens WHERE token_hash = ?", (token_hash(token),)
        ).fetchone()
        if row is None:
            return "token_unknown", "no such enrolment token"
        token_patient, expires_at, used_at, used_by = row
        if used_at is not None and used_by != device_id:
            return "token_used", "this enrolment token was already used by another box"
        if used_at is None and expires_at < now:
            return "token_expired", "this enrolment token has expired; ask the clinic for a new one"
        if token_patient != patient:
            return "patient_mismatch", "the patient reference does not match the one the token was issued for"
        return None

    # --- ingest -------------------------------------------------------------------------------
    def _key_for(
        self, device_id: str, seen: list[bytes] | None = None
    ) -> Callable[[bytes | None], cose.PublicKey | None]:
        def lookup(kid: bytes | None) -> cose.PublicKey | None:
            if kid is None:
                return None
            if seen is not None:
                seen.append(kid)
            cached = self._keys.get((device_id, kid))
            if cached is not None:
                return cached
            rows = self.db.query("SELECT cert_pem FROM device_keys WHERE kid = ? AND device_id = ?", (kid, device_id))
            if not rows:
                return None
            key = x509.load_pem_x509_certificate(rows[0][0]).public_key()
            if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
                return None
            self._keys[(device_id, kid)] = key  # keys are only ever added for a (device, kid): safe to keep
            return key

        return lookup

    def ingest(self, device_id: str, leaf: str, payload: bytes) -> dict[str, list[int]]:
        """Verify, de-duplicate and store a batch; returns the sequence numbers to acknowledge."""
        try:
            items = cbor2.loads(payload)
        except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
            self.db.bump("rejected_batches")
            log.warning("%s: telemetry batch is not CBOR", device_id)
            return {}
        if not isinstance(items, Sequence) or isinstance(items, str | bytes) or len(items) > MAX_BATCH:
            self.db.bump("rejected_batches")
            return {}
        key_for = self._key_for(device_id)
        good: list[tuple[telemetry.Record, bytes]] = []
        for item in items:
            try:
                if not isinstance(item, bytes):
                    raise SignatureError("batch item is not a byte string")
                verified = cose.verify1(item, key_for)
                rec = telemetry.decode(verified.payload)
                if rec.device_id != device_id:
                    raise SignatureError(f"record names device {rec.device_id}, published by {device_id}")
                if (rec.kind is telemetry.Kind.HEALTH) != (leaf == topics.HEALTH):
                    raise SignatureError(f"{rec.kind} record on the {leaf} topic")
            except (GlucoagentError, ValueError, TypeError, OverflowError) as exc:  # one record, not the batch
                self.db.bump("rejected_records")
                log.warning("%s: record rejected: %s", device_id, exc)
                continue
            good.append((rec, item))
        acks: dict[str, list[int]] = {"c": [], "h": [], "x": []}
        fresh: list[telemetry.Record] = []
        now = time.time()
        with self.db.tx() as db:
            binding = BackendDb.open_binding(db, device_id)
            if binding is None:  # erased, or never provisioned here: nothing to attribute the data to
                db.execute(
                    "INSERT INTO counters (name, value) VALUES ('unbound_records', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (len(good),),
                )
                log.warning("%s: %d record(s) refused: the device has no patient binding", device_id, len(good))
                return {}
            for rec, raw in good:
                stream = "h" if rec.kind is telemetry.Kind.HEALTH else "c"
                row, problem = storable(rec)
                if problem is not None:
                    self._quarantine(db, device_id, binding[0], stream, now, problem, raw)
                    log.warning("%s: record rejected alone: %s", device_id, problem)
                    # Acknowledged: the cloud holds the signed bytes, so the box may let the row go.
                    acks[stream if 0 < rec.seq <= INT64_MAX else "x"].append(rec.seq)
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO records "
                    "(device_id, stream, seq, kind, received_at, wall, clock, fields, cose, binding_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (device_id, stream, rec.seq, rec.kind.value, now, rec.wall, rec.clock, row, raw, binding[0]),
                )
                if cur.rowcount:
                    fresh.append(rec)
                else:
                    db.execute(
                        "INSERT INTO counters (name, value) VALUES ('duplicates', 1) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + 1"
                    )
                acks[stream].append(rec.seq)
        if self.on_record:
            for rec in fresh:
                self.on_record(device_id, rec)
        return {k: v for k, v in acks.items() if v}

    @staticmethod
    def _quarantine(db: Any, device_id: str, binding_id: int, stream: str, now: float, reason: str, raw: bytes) -> None:
        db.execute(
            "INSERT OR IGNORE INTO quarantine (digest, device_id, binding_id, stream, received_at, reason, cose) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (hashlib.sha256(raw).hexdigest(), device_id, binding_id, stream, now, reason, raw),
        )
        db.execute(
            "INSERT INTO counters (name, value) VALUES ('rejected_records', 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1"
        )

    def on_status(self, device_id: str, payload: bytes) -> None:
        status = payload.decode("utf-8", "replace")[:32]
        with self.db.tx() as db:
            db.execute(
                "UPDATE devices SET status = ?, status_at = ? WHERE device_id = ?", (status, time.time(), device_id)
            )
            if status == "online":
                db.execute(
                    "UPDATE devices SET confirmed_at = coalesce(confirmed_at, ?) WHERE device_id = ?",
                    (time.time(), device_id),
                )

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


def storable(rec: telemetry.Record) -> tuple[str, str | None]:
    """(fields as JSON, None) when every field fits its column; ("", why) when one does not.

    Checked before any SQL: SQLite raises OverflowError for an integer beyond 64 bits, and that
    would roll back the whole batch, so one bad record would block every good one with it.
    """
    if not 0 < rec.seq <= INT64_MAX:
        return "", f"seq {rec.seq} out of range 1..2**63-1"
    for name, value in (("wall", rec.wall), ("mono", rec.monotonic)):
        if not math.isfinite(value):
            return "", f"{name} is not a finite number"
    try:
        fields = json.dumps(_jsonable(rec.fields), sort_keys=True, allow_nan=False)
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        return "", f"a field is out of range: {exc}"
    return fields, None


def _jsonable(value: Any) -> Any:
    from decimal import Decimal

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # noqa: S105 - an alphabet; no 0/O, 1/I: technicians type these


def new_token() -> str:
    """16 characters, ~80 bits; never starts with '-', so it is never taken for a command-line option."""
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(16))


def link_settings(host: str, port: int, tls: TlsFiles) -> LinkSettings:
    return LinkSettings(host=host, port=port, client_id=f"backend-{secrets.token_hex(4)}", tls=tls, clean_start=True)


class RetentionSweeper:
    """Enforces the cloud's retention period from the running service: a sweep at start, then every interval.

    Age is judged by ``received_at``, the cloud's own clock: a box's clock may be wrong by years.
    """

    def __init__(self, db: BackendDb, days: float, interval_s: float, clock: Callable[[], float] = time.time) -> None:
        if days <= 0 or interval_s <= 0:
            raise ValueError("retention days and interval must be positive")
        self.db = db
        self.days = days
        self.interval_s = interval_s
        self.clock = clock

    def sweep(self) -> dict[str, int]:
        deleted = self.db.purge_before(self.clock() - self.days * 86_400)
        if deleted:
            log.info("retention %gd: deleted %s", self.days, ", ".join(f"{n} {t}" for t, n in sorted(deleted.items())))
        return deleted

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # a failed sweep is retried at the next interval, never ends the service
                log.exception("retention sweep failed")
            if stop.wait(self.interval_s):
                return
