"""Certificate renewal messages (docs/commands.md, "renew_certificate"; the flow is agent/identity/renewal.py).

- certificate delivery (cloud -> box, commands topic): COSE_Sign1 by the command key over
  ``{"renewal": <command or request id>, "dev", "cert", "iat", "exp"}``;
- renewal request (box -> cloud, results topic): a pending result (agent.wire.result) with code
  ``renew_request`` and data ``{"csr", "not_after"}``;
- recovery request (box -> cloud, claim path): ``{"v", "req", "recover": COSE_Sign1}``, the COSE
  message signed with the old device key over ``{"req", "dev", "csr", "iat"}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import cbor2

from agent.errors import CommandRejected, GlucoagentError, SignatureError
from agent.wire import cose
from agent.wire.topics import DEVICE_ID_RE

DELIVERY_KEY = "renewal"  # the map key that marks a certificate delivery (commands have "id" instead)
MAX_DELIVERY_BYTES = 16 * 1024
REQUEST_CODE = "renew_request"  # a renewal the box asks for itself (a pending result on its results topic)
RECOVER_KEY = "recover"  # the map key that marks a re-enrolment request on the claim path


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    renewal: str  # id of the renew_certificate command (or renewal request) this answers
    cert_pem: bytes  # leaf first, then the chain


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryRequest:
    """A verified re-enrolment request: the device it names, its new CSR, and the kid that signed it."""

    device_id: str
    csr_pem: bytes
    kid: bytes


class RecoveryRefused(GlucoagentError):
    """A recovery request that is not believed; ``code`` goes into the reply."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


# --- certificate delivery --------------------------------------------------------------------------
def encode_delivery(
    command_key: cose.PrivateKey, renewal_id: str, device_id: str, cert_pem: bytes, *, issued_at: int, expires_at: int
) -> bytes:
    body = {DELIVERY_KEY: renewal_id, "dev": device_id, "cert": cert_pem, "iat": issued_at, "exp": expires_at}
    return cose.sign1(command_key, cbor2.dumps(body, canonical=True))


def is_delivery_body(body: Mapping[Any, Any]) -> bool:
    return isinstance(body.get(DELIVERY_KEY), str)


def delivery_from_body(body: Mapping[Any, Any], device_id: str) -> Delivery:
    """Check the verified payload map of a delivery. Raises CommandRejected."""
    if not is_delivery_body(body):
        raise CommandRejected("malformed", "not a certificate delivery")
    if body.get("dev") != device_id:
        raise CommandRejected("wrong_device", "certificate delivery for another device")
    cert, exp = body.get("cert"), body.get("exp")
    if not isinstance(cert, bytes) or not cert:
        raise CommandRejected("malformed", "cert must be a byte string")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or (isinstance(exp, float) and not math.isfinite(exp)):
        raise CommandRejected("malformed", "exp must be a number")
    return Delivery(body[DELIVERY_KEY], cert)


def decode_delivery(data: bytes, command_key: cose.PublicKey, device_id: str) -> Delivery:
    """Verify and parse a certificate delivery. Raises CommandRejected."""
    if len(data) > MAX_DELIVERY_BYTES:
        raise CommandRejected("oversize", f"delivery of {len(data)} bytes exceeds {MAX_DELIVERY_BYTES}")
    try:
        verified = cose.verify1(data, lambda _kid: command_key)
        body = cbor2.loads(verified.payload)
    except SignatureError as exc:
        raise CommandRejected("bad_signature", str(exc)) from None
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CommandRejected("malformed", f"payload is not CBOR: {exc}") from None
    if not isinstance(body, Mapping):
        raise CommandRejected("malformed", "not a certificate delivery")
    return delivery_from_body(body, device_id)


# --- re-enrolment over the claim path ----------------------------------------------------------------
def encode_recovery_request(request_id: str, device_id: str, old_key: cose.PrivateKey, csr: bytes, now: float) -> bytes:
    """The claim-path request: the CSR for the new key, signed (COSE) with the old device key."""
    return cbor2.dumps({"v": 1, "req": request_id, RECOVER_KEY: sign_recovery(request_id, device_id, old_key, csr, now)})


def sign_recovery(request_id: str, device_id: str, old_key: cose.PrivateKey, csr: bytes, now: float) -> bytes:
    """The proof a re-enrolment carries (``decode_recovery`` checks it): COSE_Sign1 by the old device key over
    ``{"req", "dev", "csr", "iat"}``. Also the AWS renewal's proof (template parameter, agent/wire/aws.py)."""
    inner = cbor2.dumps({"req": request_id, "dev": device_id, "csr": csr, "iat": int(now)}, canonical=True)
    return cose.sign1(old_key, inner, kid=cose.key_id(old_key.public_key()))


def claimed_device(signed: object) -> str:
    """The device a recovery request names, read before verification (to know whose keys to try)."""
    if not isinstance(signed, bytes):
        raise RecoveryRefused("bad_request", "recover must be a COSE_Sign1")
    try:
        body = cbor2.loads(cose.parse_sign1(signed)[3])
    except (SignatureError, cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise RecoveryRefused(
            "bad_signature", "the request is not signed with a key registered for that device"
        ) from None
    if isinstance(body, dict) and "dev" not in body:  # as the cloud always answered it
        raise RecoveryRefused("bad_signature", "the request is not signed with a key registered for that device")
    device_id = body.get("dev") if isinstance(body, dict) else None
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise RecoveryRefused("bad_request", "recover names no valid device")
    return device_id


def decode_recovery(
    signed: object, request_id: str, key_for_kid: Callable[[bytes | None], cose.PublicKey | None]
) -> RecoveryRequest:
    """Verify the ``recover`` member of a claim-path request against the claimed device's keys.

    Raises RecoveryRefused (``bad_request`` / ``bad_signature``), with the codes the cloud replies with."""
    device_id = claimed_device(signed)
    assert isinstance(signed, bytes)
    try:
        verified = cose.verify1(signed, key_for_kid)
        body = cbor2.loads(verified.payload)
    except (SignatureError, cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise RecoveryRefused(
            "bad_signature", "the request is not signed with a key registered for that device"
        ) from None
    csr_pem = body.get("csr") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(csr_pem, bytes) or body.get("req") != request_id:
        raise RecoveryRefused("bad_request", "signed request id or CSR missing")
    if verified.kid is None:
        raise RecoveryRefused("bad_signature", "the request names no key")
    return RecoveryRequest(device_id, csr_pem, verified.kid)
