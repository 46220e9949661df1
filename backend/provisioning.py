"""Provisioning on the claim path: a one-time enrolment token, a CSR and a patient reference in, a device
certificate, the CA, the command key and the initial config out (docs/provisioning.md); and re-enrolment of a
box whose certificate expired, signed with its registered key. A mixin of ``BackendService``."""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.errors import GlucoagentError
from agent.wire import cose
from agent.wire import provisioning as wire_provisioning
from agent.wire import renewal as wire_renewal
from backend.commands import device_key_lookup, key_in_good_standing
from backend.db import BackendDb
from backend.pki import PkiError

if TYPE_CHECKING:
    from backend.service import BackendKeys

log = logging.getLogger(__name__)
# Refusal codes a box maps to its own exit codes (agent/identity/provisioning.py).
BOUND_TO_OTHER_PATIENT = "bound_to_other_patient"
UNSUPPORTED_KEY = "unsupported_key"
# Re-enrolment over the claim path is for a certificate that has expired; this much clock difference
# between box and cloud is allowed (the box decides by its own clock that it has expired).
RECOVERY_SKEW_S = 86_400.0
TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # noqa: S105 - an alphabet; no 0/O, 1/I: technicians type these


def new_token() -> str:
    """16 characters, ~80 bits; never starts with '-', so it is never taken for a command-line option."""
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(16))


class ProvisioningMixin:
    db: BackendDb
    keys: BackendKeys
    initial_config: dict[str, Any]
    _keys: dict[tuple[str, bytes], cose.PublicKey]
    renews_by_enrolment = False  # the service sets it from its cloud adapter (backend/clouds/adapter.py)

    def provision(self, request_id: str, payload: bytes) -> dict[str, Any]:
        def refuse(code: str, message: str) -> dict[str, Any]:
            log.warning("provisioning %s refused: %s (%s)", request_id, code, message)
            self.db.bump(f"provision_{code}")
            return wire_provisioning.refusal(code, message)

        try:
            req = wire_provisioning.decode_request(payload, request_id)
        except wire_provisioning.RequestRefused as exc:
            return refuse(exc.code, str(exc))
        if isinstance(req, wire_provisioning.RecoverRequest):
            return self.recover(request_id, req.signed, refuse)
        token, patient, csr_pem, hw = req.token, req.patient, req.csr_pem, req.hw
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
        device_id = wire_provisioning.device_id_for(public_key)
        hw_serial = str(hw.get("serial", ""))
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
                # A device's patient is never re-pointed here: _check_binding refused a different one.
                BackendDb.enrol_device(
                    db, token=token, device_id=device_id, patient=patient, hw_serial=hw_serial, kid=kid,
                    cert_pem=cert_pem, now=now,
                )  # fmt: skip
        if refusal is not None:  # counted after the transaction: the counter opens its own
            return refuse(*refusal)
        log.info("provisioned %s (hardware %s)", device_id, hw_serial)
        self.db.bump("provisioned")
        reply: dict[str, Any] = {
            "ok": True,
            "device_id": device_id,
            "cert": cert_pem + self.keys.ca_pem,
            "ca": self.keys.ca_pem,
            "command_key": self.keys.command_pub_pem,
            "config": self.initial_config,
        }
        if self.keys.release_pub_pem is not None:  # the box pins it for updates (docs/updates.md)
            reply["release_key"] = self.keys.release_pub_pem
        return reply

    def recover(self, request_id: str, signed: object, refuse: Callable[[str, str], dict[str, Any]]) -> dict[str, Any]:
        """Re-enrolment of a box whose certificate expired (agent/identity/recovery.py ``recover``): no token, but the
        request is signed with the device's registered key; the new certificate keeps the device id,
        and with it the patient binding, and the old key stays registered for readings signed with it."""
        try:
            device_id = wire_renewal.claimed_device(signed)
            request = wire_renewal.decode_recovery(
                signed, request_id, device_key_lookup(self.db, device_id, cache=self._keys)
            )
        except wire_renewal.RecoveryRefused as exc:
            return refuse(exc.code, str(exc))
        csr_pem, kid = request.csr_pem, request.kid
        why = key_in_good_standing(self.db, device_id, kid, self.keys.revoked())
        if why is not None:
            return refuse("not_recoverable", why)
        registered = self.db.device_key(device_id, kid)
        assert registered is not None  # key_in_good_standing found it
        left = x509.load_pem_x509_certificate(registered[0]).not_valid_after_utc.timestamp() - time.time()
        if left > RECOVERY_SKEW_S and not self.renews_by_enrolment:
            return refuse("not_expired", f"the certificate is valid for {left / 86_400:.1f} more days: renew it over "
                          "the device's own topics")  # fmt: skip
        try:
            public_key = x509.load_pem_x509_csr(csr_pem).public_key()
            if not isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
                return refuse("bad_csr", "device key must be Ed25519 or EC P-256")
            cert_pem = self.keys.sign_csr(csr_pem, device_id)  # checks the CSR's own signature
        except (ValueError, UnsupportedAlgorithm, GlucoagentError) as exc:
            return refuse("bad_csr", f"CSR refused: {exc}")
        self.db.add_key(kid=cose.key_id(public_key), device_id=device_id, cert_pem=cert_pem, now=time.time())
        log.info("%s re-enrolled (certificate %s %.1f days)", device_id, "valid for" if left > 0 else "expired", abs(left) / 86_400)
        self.db.bump("recovered")
        return {"ok": True, "device_id": device_id, "cert": cert_pem + self.keys.ca_pem}

    @staticmethod
    def _check_binding(db: sqlite3.Connection, device_id: str, patient: str) -> tuple[str, str] | None:
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
    def _check_token(
        db: sqlite3.Connection, token: str, patient: str, device_id: str, now: float
    ) -> tuple[str, str] | None:
        """(code, message) when the token may not enrol this device; None when it may."""
        row = BackendDb.find_token(db, token)
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
