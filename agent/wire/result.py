"""The command result (docs/commands.md): encoded on the box, signed with the device key; verified by the cloud.

Payload: canonical CBOR ``{id, dev, status, code, message, data}``, COSE_Sign1 by the device key.
A result is believed only if it verifies against a key the cloud registered for the device
that published it (the caller's ``key_for_kid``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import cbor2

from agent.errors import SignatureError
from agent.wire import cose

STATUSES = ("ok", "failed", "refused", "pending")


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    id: str
    device_id: str
    status: str
    code: str
    message: str
    data: Mapping[str, Any]


def encode_result(
    cmd_id: str, device_id: str, status: str, code: str, message: str, data: Mapping[str, Any] | None = None
) -> bytes:
    """The payload the box signs (the signature is the caller's: its signer holds the live key)."""
    return cbor2.dumps(
        {"id": cmd_id, "dev": device_id, "status": status, "code": code, "message": message, "data": dict(data or {})},
        canonical=True,
    )


def decode_result(
    payload: bytes, key_for_kid: Callable[[bytes | None], cose.PublicKey | None], device_id: str
) -> Result:
    """Verify a signed result published by ``device_id``; raises SignatureError."""
    verified = cose.verify1(payload, key_for_kid)
    try:
        body = cbor2.loads(verified.payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SignatureError(f"result payload is not CBOR: {exc}") from None
    if not isinstance(body, dict):
        raise SignatureError("result payload is not a map")
    if body.get("dev") != device_id:
        raise SignatureError(f"result names device {body.get('dev')!r}, published by {device_id}")
    fields = [body.get(k) for k in ("id", "status", "code", "message")]
    if not all(isinstance(f, str) for f in fields) or body.get("status") not in STATUSES:
        raise SignatureError("result fields id/status/code/message malformed")
    data = body.get("data", {})
    return Result(
        str(fields[0]),
        device_id,
        str(fields[1]),
        str(fields[2]),
        str(fields[3]),
        data if isinstance(data, dict) else {},
    )
