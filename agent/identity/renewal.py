"""Certificate renewal on the box: a new key, a CSR, the new certificate tried, then a crash-safe swap.

The exchange runs over the device's own topics (docs/commands.md, "renew_certificate"); its messages
are encoded and decoded in agent/wire/renewal.py:

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

The box also starts the same exchange by itself (``RenewalSchedule``, run by the daemon): once
its certificate is within ``agent.renew_before_days`` of notAfter it publishes a *renewal
request* on its results topic (a result with its own id ``r…``, status ``pending``, code
``renew_request``, signed with the current key, data ``{"csr", "not_after"}``) and the backend
answers with the same certificate delivery. The backend revokes the old certificate once the
final ``renewed`` result, signed with the new key, arrives: the box sends it only after the
new pair logged in and was swapped in.

A box whose certificate expired while it was offline cannot log in as itself any more. It
comes back over the claim path (``recover``): connected with the factory claim certificate,
confined to the provisioning topics, it sends ``{"v", "req", "recover": COSE_Sign1}``, the COSE
message signed with the old device key over ``{"req", "dev", "csr", "iat"}``. The backend
checks the signature against the key it registered for that device, that the certificate of
that key is not revoked and has expired (or nearly), and answers on the reply topic with a
certificate for the same device id. Same checks, same crash-safe swap as above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature

from agent.errors import GlucoagentError
from agent.fsutil import atomic_write, fsync_dir
from agent.identity import der
from agent.identity.credentials import (
    CERT_FILE,
    KEY_FILE,
    build_csr,
    generate_key,
    hardware_serial,
    key_pem,
    not_after,
)
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.wire import cose

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

RENEW_DIR = "renew"
COMMIT = "COMMIT"
FACTORY_DIR = "factory"  # the claim certificate and key the box was flashed with
RETRY_MIN_S = 10.0  # a failed renewal or recovery is tried again after this, doubling
RETRY_MAX_S = 6 * 3600.0  # renewal: the certificate is still valid, no hurry
RECOVER_RETRY_MAX_S = 300.0  # re-enrolment: the box is cut off until it succeeds (as the uplink's backoff cap)
# Re-enrolment refusals that retrying does not change (revoked, deprovisioned, no proof): tried again
# only every RETRY_MAX_S, with an error line, in case the cloud side is put right.
RECOVERY_REFUSALS = frozenset({"bad_signature", "not_recoverable", "no_claim", "bad_request"})
SETTLE_S = 86_400.0  # a certificate that is due right after its renewal: wait this long (no renewal storm)


class RenewalError(GlucoagentError):
    """The renewal could not complete; the old credentials stay in use. ``code`` goes into the result."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def renew_dir(state_dir: Path) -> Path:
    return state_dir / RENEW_DIR


def stage_key(state_dir: Path, key_type: str, common_name: str | None = None) -> tuple[cose.PrivateKey, bytes]:
    """A fresh key written to ``renew/`` (0600) and its CSR. The live key is untouched."""
    discard(state_dir)
    key = generate_key(key_type)
    atomic_write(renew_dir(state_dir) / KEY_FILE, key_pem(key))
    return key, build_csr(key, hardware_serial(), common_name)


def _spki(key: cose.PublicKey | object) -> bytes:
    from cryptography.hazmat.primitives import serialization  # renewal only (RSS, docs/field.md)

    assert hasattr(key, "public_bytes")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


def check_certificate(chain_pem: bytes, key: cose.PrivateKey, device_id: str, ca_pem: bytes | None) -> x509.Certificate:
    """The delivered leaf must carry the staged key, name this device and be issued by the pinned CA
    (``ca_pem`` None: a cloud whose issuing CA the box does not hold, AWS; the trial login checks it there)."""
    # x509 only while a certificate is checked (renewal, re-enrolment): not at steady state (RSS, docs/field.md)
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
        ca = None if ca_pem is None else x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise RenewalError("bad_certificate", f"unreadable certificate: {exc}") from None
    leaf = certs[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise RenewalError("bad_certificate", "the certificate is not for the key this box made")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != device_id:
        raise RenewalError("bad_certificate", "the certificate names another device")
    try:
        if ca is not None:
            leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise RenewalError("bad_certificate", f"not issued by the pinned fleet CA: {exc!r}") from None
    if not_after(leaf) < time.time():
        raise RenewalError("bad_certificate", "the certificate has already expired")
    return leaf


def try_login(state_dir: Path, running: LinkSettings, chain_pem: bytes, *, alone: bool = False) -> None:
    """Log in with the staged key and the new certificate on a side connection; raises RenewalError.
    ``alone``: as the device itself, while its own link is held down (a cloud with one connection per device)."""
    staged = renew_dir(state_dir)
    atomic_write(staged / CERT_FILE, chain_pem)
    try:
        side = dataclasses.replace(running, clean_start=False, will=None) if alone else running.side("renew")
    except GlucoagentError as exc:
        raise RenewalError("one_connection_only", str(exc)) from None
    # the broker's trust anchor as the running link has it (mqtt.server_ca, or the fleet CA)
    settings = dataclasses.replace(side, tls=TlsFiles(ca=running.tls.ca, cert=staged / CERT_FILE, key=staged / KEY_FILE))
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
    """Finish a committed swap (also after a crash mid-way); an uncommitted staged key (a renewal a crash cut
    off before its commit) is dropped. True when a swap was completed."""
    staged = renew_dir(state_dir)
    if not (staged / COMMIT).exists():
        discard(state_dir)
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
        "not_after": int(not_after(leaf)),
        "kid": cose.key_id(leaf.public_key()).hex(),  # type: ignore[arg-type]
    }


def cert_not_after(cert_path: Path) -> float:
    """notAfter of the leaf in ``cert_path`` (Unix seconds); 0 when unreadable (renewal due at once)."""
    try:
        pem = cert_path.read_bytes()
    except OSError:
        return 0.0
    seconds = der.cert_not_after(pem)  # read at every start: without x509 (RSS, docs/field.md)
    if seconds is not None:
        return seconds
    from cryptography import x509  # what the small reader does not know: the full parser

    try:
        return not_after(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return 0.0


def new_request_id() -> str:
    return "r" + secrets.token_hex(12)


# --- when to renew ---------------------------------------------------------------------------------
class RenewalSchedule:
    """When the box renews by itself: computed once from notAfter, then a comparison per daemon tick.

    ``action`` says what to start: ``renew`` (the certificate is within the margin and the link is
    up) or ``recover`` (it has expired and the link is down: the broker refuses it). At most one
    attempt runs at a time; a failure waits ``RETRY_MIN_S`` doubling up to ``RETRY_MAX_S`` (monotonic
    time, so a clock step cannot cause a storm of attempts).
    """

    def __init__(self, not_after: float, margin_s: float) -> None:
        self.margin_s = margin_s
        self._lock = threading.Lock()
        self._busy = False
        self._failures = 0
        self._retry_at = 0.0  # monotonic
        self.not_after = not_after
        self.due_at = not_after - margin_s

    def action(self, wall: float, mono: float, connected: bool) -> str | None:
        with self._lock:
            if self._busy or wall < self.due_at or mono < self._retry_at:
                return None
            if connected:
                kind = "renew"
            elif wall >= self.not_after:
                kind = "recover"
            else:
                return None  # due but not expired: wait for the link, the ordinary path is cheaper
            self._busy = True
            return kind

    def succeeded(self, not_after: float, wall: float, mono: float) -> None:
        with self._lock:
            self._busy, self._failures = False, 0
            self.not_after, self.due_at = not_after, not_after - self.margin_s
            # A new certificate that is due already (the cloud's lifetime is shorter than the margin, or
            # this box's clock runs ahead of the cloud's): renew it again only after a day, not at once.
            self._retry_at = mono + SETTLE_S if wall >= self.due_at else 0.0
        if wall >= self.due_at:
            log.warning(
                "the new certificate expires in %.1f days, within agent.renew_before_days: next renewal in %.0f s",
                (not_after - wall) / 86_400,
                SETTLE_S,
            )

    def failed(self, mono: float, cap_s: float = RETRY_MAX_S) -> float:
        """Record a failed attempt; returns the seconds until the next one (at most ``cap_s``)."""
        with self._lock:
            self._busy = False
            delay = min(RETRY_MIN_S * 2.0 ** min(self._failures, 30), cap_s)
            self._failures += 1
            self._retry_at = mono + delay
            return delay
