"""Claim-path provisioning (docs/provisioning.md): the enrolment request and the cloud's reply.

Request (box -> ``gluco/v1/prov/<req>/request``, CBOR): ``{"v": 1, "req", "csr", "token", "patient",
"hw": {"serial", "machine", "agent"}}``; a re-enrolment carries ``"recover"`` instead of the token
(agent.wire.renewal). Reply (cloud -> ``.../response``, CBOR): ``{"ok": true, "device_id", "cert",
"ca", "command_key", "config"}`` (since issue 16 also ``"release_key"``, the PEM public key that signs
release manifests, docs/updates.md; a cloud without it leaves the box unable to update) or ``{"ok": false, "code", "message"}``; a recovery's reply has only
``device_id`` and ``cert``.

The device's presence on its status topic (retained, the last will says offline) is the two payloads
``STATUS_ONLINE`` / ``STATUS_OFFLINE``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import cbor2

from agent.errors import GlucoagentError, ProvisioningError
from agent.wire import cose
from agent.wire.renewal import RECOVER_KEY
from agent.wire.topics import DEVICE_ID_RE

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"


class RequestRefused(GlucoagentError):
    """An enrolment request the cloud answers with a refusal; ``code`` goes into the reply."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class EnrolRequest:
    request_id: str
    csr_pem: bytes
    token: str
    patient: str
    hw: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class RecoverRequest:
    """A re-enrolment on the claim path: ``signed`` is checked by ``agent.wire.renewal.decode_recovery``."""

    request_id: str
    signed: object


def encode_request(request_id: str, csr_pem: bytes, token: str, patient: str, hw: Mapping[str, str]) -> bytes:
    request = {"v": 1, "req": request_id, "csr": csr_pem, "token": token, "patient": patient, "hw": dict(hw)}
    return cbor2.dumps(request)


def decode_request(payload: bytes, request_id: str) -> EnrolRequest | RecoverRequest:
    """What the cloud reads from the request topic of ``request_id``. Raises RequestRefused."""
    try:
        req = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise RequestRefused("bad_request", "request is not CBOR") from None
    if not isinstance(req, dict) or req.get("req") != request_id:
        raise RequestRefused("bad_request", "request id does not match its topic")
    if RECOVER_KEY in req:
        return RecoverRequest(request_id, req[RECOVER_KEY])
    token, patient, csr_pem, hw = req.get("token"), req.get("patient"), req.get("csr"), req.get("hw", {})
    if not (isinstance(token, str) and isinstance(patient, str) and isinstance(csr_pem, bytes) and patient):
        raise RequestRefused("bad_request", "token, patient and csr are required")
    return EnrolRequest(request_id, csr_pem, token, patient, hw if isinstance(hw, dict) else {})


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """The cloud's answer: ``{"ok": True, ...}`` or ``refusal(code, message)``."""
    return cbor2.dumps(dict(reply))


def refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def decode_reply(payload: bytes) -> dict[str, Any]:
    """The reply as a map; an unreadable one reads as the refusal ``bad_reply`` (never raises)."""
    try:
        reply = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        return refusal("bad_reply", "unreadable reply")
    if not isinstance(reply, dict):
        return refusal("bad_reply", "unreadable reply")
    return reply


def check_reply(reply: Mapping[str, Any]) -> None:
    """An accepting enrolment reply must carry every part, with the right types, before anything is written."""
    if not isinstance(reply.get("device_id"), str) or not DEVICE_ID_RE.match(reply["device_id"]):
        raise ProvisioningError("the provisioning service's reply has no valid device id")
    for name in ("cert", "ca", "command_key"):
        if not isinstance(reply.get(name), bytes) or b"-----BEGIN" not in reply[name]:
            raise ProvisioningError(f"the provisioning service's reply has no valid {name}")
    release_key = reply.get("release_key")
    if release_key is not None and (not isinstance(release_key, bytes) or b"-----BEGIN" not in release_key):
        raise ProvisioningError("the provisioning service's reply has an invalid release_key")
    if not isinstance(reply.get("config", {}), dict):
        raise ProvisioningError("the provisioning service's reply has an invalid initial config")


def device_id_for(public_key: cose.PublicKey) -> str:
    """Device ids derive from the device key: a re-run of provisioning maps to the same id, and a box knows
    its id before it enrols (DPS's registration id, agent/identity/dps.py)."""
    return "gd-" + cose.key_id(public_key)[:6].hex()
