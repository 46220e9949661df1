"""The cloud side of commands: sign, send, receive verified results, and issue renewed certificates.

- ``sign_command``: a fresh command id and lifetime, encoded by ``agent.wire.command.encode_command``.
- ``parse_args``: ``key=value`` words from the command line, typed by ``agent.wire.command.COMMANDS``.
- ``verify_result``: a result is believed only if it verifies (``agent.wire.result.decode_result``)
  against a key registered for the device that published it (backend db ``device_keys``).
- ``on_result``: what ``BackendService.on_result`` does: verify, store by command id (a pending
  renewal result is followed by the final one; duplicates are ignored), and answer a
  renewal's CSR with a certificate delivery (``agent.wire.renewal.encode_delivery``) when we did send that command,
  or when the box asked for it itself (``renew_request``) with its current, unrevoked key.
  A final ``renewed`` result signed with the new key proves the new pair logged in and is in
  use: then every older certificate of the device is revoked (``revoke_superseded``).
- ``CommandClient``: ``glucoagent-backend command``: publish (QoS 1, so a box that is offline
  gets it from its persistent session on return) and wait for the final result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.errors import GlucoagentError, LinkTimeout, SignatureError
from agent.wire import cose
from agent.wire.command import COMMANDS, MAX_LIFETIME_S, encode_command
from agent.wire.renewal import REQUEST_CODE, encode_delivery
from agent.wire.result import Result, decode_result
from backend.clouds.adapter import RESULTS, CloudAdapter
from backend.db import BackendDb, jsonable
from backend.mqtt_client import BackendLink, LinkSettings

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 3600.0
DELIVERY_TTL_S = 300.0
FINAL_RENEWAL_CODES = ("renewed", "recovered")  # the box runs on the new pair: older certificates go


class CommandError(GlucoagentError):
    """A command could not be built or sent, or its result did not verify."""

    exit_code = 70


class ResultTimeout(LinkTimeout):
    """No final result within the wait; the broker keeps the command for the box until it expires."""


def result_json(result: Result) -> str:
    """What ``glucoagent-backend command`` prints: the verified result, bytes as text (PEM) or hex."""
    return json.dumps(
        {"id": result.id, "device": result.device_id, "status": result.status, "code": result.code,
         "message": result.message, "data": jsonable(result.data)},
        indent=2,
        sort_keys=True,
    )  # fmt: skip


def new_command_id() -> str:
    return "c" + secrets.token_hex(12)


def sign_command(
    key: ed25519.Ed25519PrivateKey,
    device_id: str,
    ctype: str,
    args: Mapping[str, Any] | None = None,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    now: float | None = None,
    cmd_id: str | None = None,
) -> tuple[str, bytes]:
    """(command id, envelope). Arguments are not validated here: the box is the judge."""
    if not 0 < ttl_s <= MAX_LIFETIME_S:
        raise CommandError(f"--ttl: expected 0 < ttl <= {MAX_LIFETIME_S}, got {ttl_s}")
    now = time.time() if now is None else now
    cmd_id = cmd_id or new_command_id()
    return cmd_id, encode_command(
        key, cmd_id, device_id, ctype, args or {}, issued_at=int(now), expires_at=int(now + ttl_s)
    )


def parse_args(ctype: str, words: Sequence[str]) -> dict[str, Any]:
    """``["first=1", "last=9"]`` -> ``{"first": 1, "last": 9}``, typed by the command's schema."""
    if ctype not in COMMANDS:
        raise CommandError(f"unknown command type {ctype!r} (known: {', '.join(COMMANDS)})")
    schema = COMMANDS[ctype]
    out: dict[str, Any] = {}
    for word in words:
        name, sep, text = word.partition("=")
        if not sep:
            raise CommandError(f"argument {word!r}: expected key=value")
        spec = schema.get(name)
        if spec is None:
            raise CommandError(f"{ctype}: unknown argument {name!r} (known: {', '.join(schema) or 'none'})")
        try:
            out[name] = _convert(spec.kind, text)
        except ValueError:
            raise CommandError(f"{ctype}: {name} must be {spec.kind.__name__}, got {text!r}") from None
    return out


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is bytes:  # a file's content: update manifest=PACKAGE.manifest (docs/updates.md)
        try:
            return Path(text).read_bytes()
        except OSError as exc:
            raise ValueError(text) from exc
    return text


def _csr_key(csr_pem: object) -> cose.PublicKey:
    if not isinstance(csr_pem, bytes):
        raise TypeError("csr must be a byte string")
    public_key = x509.load_pem_x509_csr(csr_pem).public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise TypeError("unsupported key type")
    return public_key


def device_key_lookup(
    db: BackendDb,
    device_id: str,
    seen: list[bytes] | None = None,
    cache: dict[tuple[str, bytes], cose.PublicKey] | None = None,
) -> Callable[[bytes | None], cose.PublicKey | None]:
    """kid -> the device's registered public key (ingest, results and re-enrolment all verify through
    this); ``seen`` collects the kid asked for (the signer's); ``cache`` keeps keys found."""

    def lookup(kid: bytes | None) -> cose.PublicKey | None:
        if kid is None:
            return None
        if seen is not None:
            seen.append(kid)
        if cache is not None and (device_id, kid) in cache:
            return cache[(device_id, kid)]
        cert = _cert_of(db, device_id, kid)
        key = cert.public_key() if cert is not None else None
        if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            return None
        if cache is not None:
            cache[(device_id, kid)] = key
        return key

    return lookup


def verify_result(db: BackendDb, device_id: str, payload: bytes, seen: list[bytes] | None = None) -> Result:
    """Verify a result against the device's registered keys (``agent.wire.result``); raises SignatureError."""
    return decode_result(payload, device_key_lookup(db, device_id, seen), device_id)


# --- the service side ------------------------------------------------------------------------------
def record_sent(db: BackendDb, device_id: str, cmd_id: str, ctype: str) -> None:
    """Remember what we sent (a renewal CSR is only answered for a renew_certificate we sent)."""
    db.record_command_sent(device_id, cmd_id, ctype, time.time())


def store_result(db: BackendDb, result: Result, payload: bytes) -> bool:
    """Keep the first final result per (device, command id); True when this one was stored."""
    key = result.id or "unknown-" + _digest(payload)
    return db.store_final_result(
        device_id=result.device_id, command_id=key, status=result.status, code=result.code, message=result.message,
        data=json.dumps(jsonable(result.data), sort_keys=True), cose=payload, now=time.time(),
    )  # fmt: skip


def stored_result(db: BackendDb, device_id: str, cmd_id: str) -> tuple[str, str, str, Any] | None:
    row = db.command_result(device_id, cmd_id)
    if row is None:
        return None
    status, code, message, data = row
    return status, code, message, json.loads(data) if data else None


def on_result(
    db: BackendDb,
    device_id: str,
    payload: bytes,
    *,
    sign_csr: Callable[[bytes, str], bytes],
    ca_pem: bytes,
    command_key: ed25519.Ed25519PrivateKey,
    deliver: Callable[[str, bytes], None],
    revoke: Callable[[Sequence[int]], None] | None = None,
    revoked: Callable[[], frozenset[int]] = frozenset,
) -> Result | None:
    seen: list[bytes] = []
    try:
        result = verify_result(db, device_id, payload, seen)
    except SignatureError as exc:
        db.bump("rejected_results")
        log.warning("%s: result rejected: %s", device_id, exc)
        return None
    signer_kid = seen[-1]
    fresh = store_result(db, result, payload)
    log.info("%s: command %s %s: %s (%s)", device_id, result.id or "?", result.status, result.code, result.message)
    if fresh and result.status == "pending" and result.code in ("csr", REQUEST_CODE):
        asked = result.code == REQUEST_CODE and _may_renew_itself(db, device_id, signer_kid, revoked())
        delivery = issue_renewal(
            db, result, sign_csr=sign_csr, ca_pem=ca_pem, command_key=command_key, asked_by_device=asked
        )
        if delivery is not None:
            deliver(device_id, delivery)  # (device id, signed payload) the way the device's cloud sends commands
    if fresh and result.status == "ok" and result.code in FINAL_RENEWAL_CODES and revoke is not None:
        revoke_superseded(db, device_id, signer_kid, revoke, revoked())
    return result


def _cert_of(db: BackendDb, device_id: str, kid: bytes) -> x509.Certificate | None:
    registered = db.device_key(device_id, kid)
    return x509.load_pem_x509_certificate(registered[0]) if registered else None


def key_in_good_standing(db: BackendDb, device_id: str, kid: bytes, revoked: frozenset[int]) -> str | None:
    """Why the device's key ``kid`` may not ask for a certificate (None: it may): the device must still
    be enrolled and the certificate of that key not revoked (a superseded or withdrawn key cannot)."""
    if not db.is_enrolled(device_id):
        return "the device is not enrolled (deprovisioned?)"
    cert = _cert_of(db, device_id, kid)
    if cert is None:
        return "no certificate registered for the signing key"
    if cert.serial_number in revoked:
        return "the certificate of the signing key is revoked"
    return None


def _may_renew_itself(db: BackendDb, device_id: str, kid: bytes, revoked: frozenset[int]) -> bool:
    why = key_in_good_standing(db, device_id, kid, revoked)
    if why is not None:
        log.warning("%s: renewal request refused: %s", device_id, why)
    return why is None


def revoke_superseded(
    db: BackendDb, device_id: str, kid: bytes, revoke: Callable[[Sequence[int]], None], revoked: frozenset[int]
) -> list[int]:
    """Revoke every certificate of ``device_id`` registered before the one of key ``kid`` (the keys stay,
    so readings signed with an old key still verify). Returns the serials revoked now."""
    registered = db.device_key(device_id, kid)
    if registered is None:
        return []
    older = db.certs_registered_by(device_id, registered[1], except_kid=kid)
    serials = sorted({x509.load_pem_x509_certificate(pem).serial_number for pem in older} - revoked)
    if serials:
        revoke(serials)
        db.bump("certificates_revoked", len(serials))
        log.info("%s: new certificate in use; revoked %d older one(s): %s", device_id, len(serials),
                 ", ".join(f"{s:x}" for s in serials))  # fmt: skip
    return serials


def issue_renewal(
    db: BackendDb,
    result: Result,
    *,
    sign_csr: Callable[[bytes, str], bytes],
    ca_pem: bytes,
    command_key: ed25519.Ed25519PrivateKey,
    asked_by_device: bool = False,
) -> bytes | None:
    """Certificate for a renewal CSR: same device id, the new key registered next to the old one.

    Answered when we sent that renew_certificate, or when the device asked itself (``asked_by_device``:
    its request verified against its current, unrevoked key; see ``on_result``)."""
    if not asked_by_device and db.sent_command_type(result.device_id, result.id) != "renew_certificate":
        log.warning("%s: CSR for %s, which is not a renew_certificate we sent: ignored", result.device_id, result.id)
        db.bump("renewal_refused")
        return None
    csr_pem = result.data.get("csr")
    try:
        public_key = _csr_key(csr_pem)
        assert isinstance(csr_pem, bytes)
        cert_pem = sign_csr(csr_pem, result.device_id)  # checks the CSR's signature
    except (ValueError, TypeError, GlucoagentError) as exc:
        log.warning("%s: renewal CSR refused: %s", result.device_id, exc)
        db.bump("renewal_refused")
        return None
    now = time.time()
    db.add_key(kid=cose.key_id(public_key), device_id=result.device_id, cert_pem=cert_pem, now=now)
    log.info("%s: renewed certificate issued for command %s", result.device_id, result.id)
    return encode_delivery(
        command_key, result.id, result.device_id, cert_pem + ca_pem,
        issued_at=int(now), expires_at=int(now + DELIVERY_TTL_S),
    )  # fmt: skip


# --- the command-line client ---------------------------------------------------------------------
class CommandClient:
    """One backend connection that sends a command and waits for its final, verified result."""

    def __init__(self, db: BackendDb, settings: LinkSettings, cloud: CloudAdapter | None = None) -> None:
        self.db = db
        self.cloud = cloud or CloudAdapter()
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.link = BackendLink(settings, on_message=lambda t, p: self._inbox.put((t, p)))

    def __enter__(self) -> CommandClient:
        self.link.connect()
        return self

    def __exit__(self, *_: object) -> None:
        self.link.disconnect()

    def send(
        self,
        device_id: str,
        envelope: bytes,
        cmd_id: str,
        ctype: str,
        *,
        timeout_s: float,
        progress: Callable[[Result], None] = lambda _r: None,
        ttl_s: float | None = None,
    ) -> Result:
        """``ttl_s``: how long a cloud that expires undelivered messages keeps the command (Azure C2D)."""
        results_topic = self.cloud.results_topic(device_id)
        codes = self.link.subscribe([results_topic])  # before publishing: the answer may be quick
        if any(c >= 0x80 for c in codes):
            raise CommandError(f"broker refused the results subscription (codes {codes})")
        record_sent(self.db, device_id, cmd_id, ctype)
        msg = self.cloud.command(device_id, cmd_id, envelope, ttl_s=ttl_s)
        mid = self.link.publish(msg.topic, msg.payload, qos=1)
        accept_by = time.monotonic() + 10.0
        while (accepted := self.link.acked(mid)) is None:
            if time.monotonic() > accept_by or not self.link.loop(0.05):
                raise CommandError("no PUBACK from the broker for the command")
        if not accepted:
            raise CommandError("the broker refused the command")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.link.loop(0.1):
                raise CommandError("lost the broker connection while waiting for the result")
            while not self._inbox.empty():
                topic, payload = self._inbox.get_nowait()
                got = self.cloud.incoming(topic, payload)
                if got is None or got.kind != RESULTS or got.key != device_id:
                    continue
                payload = got.payload
                try:
                    result = verify_result(self.db, device_id, payload)
                except SignatureError as exc:
                    log.warning("a result on %s did not verify: %s", topic, exc)
                    continue
                if result.id != cmd_id:
                    continue
                if result.status == "pending":
                    progress(result)
                    continue
                return result
        raise ResultTimeout(
            f"no result from {device_id} within {timeout_s:g}s; the broker keeps command {cmd_id} "
            "for the box until it expires"
        )


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]
