"""Signed time for a box without a clock (docs/field.md "A box without a clock").

The box publishes ``{"nonce": 16 random bytes}`` on its ``time`` topic; the cloud answers on the
box's ``acks`` topic with a COSE_Sign1 by the command key (pinned on the box at provisioning) over
``{"dev", "nonce", "t"}``. The nonce ties the answer to this request, so a recorded old answer
cannot set the clock back.
"""

from __future__ import annotations

import cbor2

from agent.errors import SignatureError
from agent.wire import cose

NONCE_BYTES = 16
TIME_FLOOR = 1_735_689_600.0  # 2025-01-01: no honest cloud answers earlier
TIME_CEILING = 4_102_444_800.0  # 2100


def encode_time_request(nonce: bytes) -> bytes:
    return cbor2.dumps({"nonce": nonce}, canonical=True)


def decode_time_request(data: bytes) -> bytes:
    """The nonce of a request; ValueError when it is not one."""
    try:
        body = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError(f"time request is not CBOR: {exc}") from exc
    nonce = body.get("nonce") if isinstance(body, dict) else None
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError("time request carries no 16-byte nonce")
    return nonce


def encode_time_reply(command_key: cose.PrivateKey, device_id: str, nonce: bytes, now: float) -> bytes:
    return cose.sign1(command_key, cbor2.dumps({"dev": device_id, "nonce": nonce, "t": now}, canonical=True))


def decode_time_reply(data: bytes, command_key: cose.PublicKey, device_id: str, nonce: bytes) -> float | None:
    """The cloud's time if ``data`` answers our request ``nonce``; None when it is a signed message but not
    a time reply (an ack). Raises SignatureError for a bad signature or a reply to another request."""
    verified = cose.verify1(data, lambda _kid: command_key)
    try:
        body = cbor2.loads(verified.payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SignatureError(f"signed message is not CBOR: {exc}") from exc
    if not isinstance(body, dict) or "t" not in body:
        return None
    if body.get("dev") != device_id:
        raise SignatureError("time reply is not addressed to this device")
    if body.get("nonce") != nonce:
        raise SignatureError("time reply answers another request (replayed or late)")
    t = body["t"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not TIME_FLOOR <= t <= TIME_CEILING:
        raise SignatureError(f"time reply carries an impossible time: {t!r}")
    return float(t)


# The anchor the box reports (health fields) once it learnt the time: the cloud corrects every record
# of that boot with it (backend/timefix.py), since (boot id, monotonic) is right whatever the wall clock said.
ANCHOR_TRUE = "clock_anchor_t"
ANCHOR_MONO = "clock_anchor_mono"
ANCHOR_BOOT = "clock_anchor_boot"
ANCHOR_OFFSET = "clock_offset_s"


def anchor_sample(true: float, boot_id: bytes, monotonic: float, offset_s: float) -> dict[str, str | int | float | bool]:
    return {ANCHOR_TRUE: round(true, 3), ANCHOR_MONO: round(monotonic, 3), ANCHOR_BOOT: boot_id.hex(), ANCHOR_OFFSET: offset_s}


def anchor_of(fields: dict[str, object]) -> tuple[float, bytes, float] | None:
    """(true time, boot id, monotonic) from a health record's fields (with or without the ``health:`` prefix)."""
    get = {k.removeprefix("health:"): v for k, v in fields.items()}
    true, mono, boot = get.get(ANCHOR_TRUE), get.get(ANCHOR_MONO), get.get(ANCHOR_BOOT)
    if not isinstance(true, int | float) or not isinstance(mono, int | float) or not isinstance(boot, str):
        return None
    try:
        return float(true), bytes.fromhex(boot), float(mono)
    except ValueError:
        return None


def corrected_time(boot_id: bytes, monotonic: float, anchor: tuple[float, bytes, float]) -> float | None:
    """When a record of ``boot_id`` taken at ``monotonic`` really was, by the anchor of the same boot (else None)."""
    true, anchor_boot, anchor_mono = anchor
    if boot_id != anchor_boot:
        return None
    return true - (anchor_mono - monotonic)
