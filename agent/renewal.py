"""Certificate renewal on the box: a new key, a CSR, the new certificate tried, then a crash-safe swap.

The exchange runs over the device's own topics (docs/commands.md, "renew_certificate"):

1. the cloud sends the ``renew_certificate`` command;
2. the box makes a new key (staged in ``<state_dir>/renew/``, mode 0600; the old key and
   certificate stay in place and in use) and publishes a *pending* result, signed with its
   current key, whose data carries the CSR;
3. the backend checks that it did send that command, issues a certificate for the same
   device id and answers on the commands topic with a *certificate delivery*: COSE_Sign1 by
   the command key over ``{"renewal": <command id>, "dev", "cert", "iat", "exp"}``;
4. the box checks the certificate (its key is the staged key, CN is the device id, issued by
   the pinned fleet CA), logs in to the broker with the new pair (a side connection: the
   running link is not touched), and only then swaps the files.

The swap: ``renew/COMMIT`` is written, then each staged file is renamed over the live one.
Renames are atomic, and with ``COMMIT`` present a restart finishes the remaining renames
(``complete_swap``, run before the identity is loaded), so a crash leaves the old pair or the
new pair, never a mix. Without ``COMMIT`` a staged key is simply discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent import cose
from agent.errors import CommandRejected, GlucoagentError, SignatureError
from agent.fsutil import atomic_write, fsync_dir
from agent.identity import CA_FILE, CERT_FILE, KEY_FILE, build_csr, generate_key, hardware_serial, key_pem
from agent.mqtt import LinkSettings, MqttLink, TlsFiles

RENEW_DIR = "renew"
COMMIT = "COMMIT"
DELIVERY_KEY = "renewal"  # the map key that marks a certificate delivery (commands have "id" instead)
MAX_DELIVERY_BYTES = 16 * 1024


class RenewalError(GlucoagentError):
    """The renewal could not complete; the old credentials stay in use. ``code`` goes into the result."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    renewal: str  # id of the renew_certificate command this answers
    cert_pem: bytes  # leaf first, then the chain


def renew_dir(state_dir: Path) -> Path:
    return state_dir / RENEW_DIR


def stage_key(state_dir: Path, key_type: str) -> tuple[cose.PrivateKey, bytes]:
    """A fresh key written to ``renew/`` (0600) and its CSR. The live key is untouched."""
    discard(state_dir)
    key = generate_key(key_type)
    atomic_write(renew_dir(state_dir) / KEY_FILE, key_pem(key))
    return key, build_csr(key, hardware_serial())


def decode_delivery(data: bytes, command_key: cose.PublicKey, device_id: str) -> Delivery:
    """Verify and parse a certificate delivery (pure). Raises CommandRejected."""
    if len(data) > MAX_DELIVERY_BYTES:
        raise CommandRejected("oversize", f"delivery of {len(data)} bytes exceeds {MAX_DELIVERY_BYTES}")
    try:
        verified = cose.verify1(data, lambda _kid: command_key)
        body = cbor2.loads(verified.payload)
    except SignatureError as exc:
        raise CommandRejected("bad_signature", str(exc)) from None
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CommandRejected("malformed", f"payload is not CBOR: {exc}") from None
    if not isinstance(body, Mapping) or not isinstance(body.get(DELIVERY_KEY), str):
        raise CommandRejected("malformed", "not a certificate delivery")
    if body.get("dev") != device_id:
        raise CommandRejected("wrong_device", "certificate delivery for another device")
    cert, exp = body.get("cert"), body.get("exp")
    if not isinstance(cert, bytes) or not cert:
        raise CommandRejected("malformed", "cert must be a byte string")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or (isinstance(exp, float) and not math.isfinite(exp)):
        raise CommandRejected("malformed", "exp must be a number")
    return Delivery(body[DELIVERY_KEY], cert)


def is_delivery(data: bytes, command_key: cose.PublicKey, device_id: str) -> Delivery | None:
    try:
        return decode_delivery(data, command_key, device_id)
    except CommandRejected:
        return None


def _spki(key: cose.PublicKey | object) -> bytes:
    assert hasattr(key, "public_bytes")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


def check_certificate(chain_pem: bytes, key: cose.PrivateKey, device_id: str, ca_pem: bytes) -> x509.Certificate:
    """The delivered leaf must carry the staged key, name this device and be issued by the pinned CA."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise RenewalError("bad_certificate", f"unreadable certificate: {exc}") from None
    leaf = certs[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise RenewalError("bad_certificate", "the certificate is not for the key this box made")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != device_id:
        raise RenewalError("bad_certificate", "the certificate names another device")
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise RenewalError("bad_certificate", f"not issued by the pinned fleet CA: {exc!r}") from None
    if leaf.not_valid_after_utc.timestamp() < time.time():
        raise RenewalError("bad_certificate", "the certificate has already expired")
    return leaf


def try_login(state_dir: Path, running: LinkSettings, chain_pem: bytes) -> None:
    """Log in with the staged key and the new certificate on a side connection; raises RenewalError."""
    staged = renew_dir(state_dir)
    atomic_write(staged / CERT_FILE, chain_pem)
    settings = dataclasses.replace(
        running,
        client_id=f"{running.client_id}-renew",
        tls=TlsFiles(ca=state_dir / CA_FILE, cert=staged / CERT_FILE, key=staged / KEY_FILE),
        clean_start=True,
        will=None,
    )
    link = MqttLink(settings)
    try:
        link.connect()
    except GlucoagentError as exc:
        raise RenewalError("new_credentials_refused", f"the broker refused the new credentials: {exc}") from None
    finally:
        link.disconnect()


def commit(state_dir: Path) -> None:
    """Point of no return: mark the staged pair good, then swap it in (``complete_swap``)."""
    atomic_write(renew_dir(state_dir) / COMMIT, b"swap\n")
    complete_swap(state_dir)


def complete_swap(state_dir: Path) -> bool:
    """Finish a committed swap (also after a crash mid-way). True when a swap was completed."""
    staged = renew_dir(state_dir)
    if not (staged / COMMIT).exists():
        return False
    for name in (KEY_FILE, CERT_FILE):  # each rename is atomic; repeating the loop is harmless
        if (staged / name).exists():
            os.replace(staged / name, state_dir / name)
    fsync_dir(state_dir)
    (staged / COMMIT).unlink()
    discard(state_dir)
    return True


def discard(state_dir: Path) -> None:
    """Drop an uncommitted staged key (the old credentials were never touched)."""
    staged = renew_dir(state_dir)
    if staged.exists() and not (staged / COMMIT).exists():
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            fsync_dir(state_dir)


def certificate_summary(leaf: x509.Certificate) -> dict[str, str | int]:
    return {
        "serial": f"{leaf.serial_number:x}",
        "not_after": int(leaf.not_valid_after_utc.timestamp()),
        "kid": cose.key_id(leaf.public_key()).hex(),  # type: ignore[arg-type]
    }
