"""The command envelope (docs/commands.md): the cloud's encoder, the box's checks, the expiry rule.

Envelope: COSE_Sign1 by the cloud's command key (pinned at provisioning) over a
CBOR map ``{id, dev, type, args, iat, exp}``. Checks, in order: size, signature,
shape, target device, expiry (replay is the journal's job, agent/commands/executor.py).
``agent.wire.inbound.classify`` verifies an incoming message once and calls
``command_from_body`` here on the verified payload.

Expiry: the box keeps a *cloud time floor*, the highest ``iat`` of any verified
command (persisted). A command is expired when ``exp`` is below that floor, always;
and, when the wall clock is plausible (2025 or later), also when ``exp`` is below
the wall clock. A box that believes it is 1970 is therefore judged by cloud time
alone, and a box with a plausible but stale clock cannot be fooled by a late replay.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import cbor2

from agent.errors import CommandRejected, SignatureError
from agent.wire import cose

MAX_COMMAND_BYTES = 16 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_LIFETIME_S = 30 * 86_400
CLOCK_SKEW_S = 300


@dataclasses.dataclass(frozen=True, slots=True)
class ArgSpec:
    kind: type
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None


# type -> argument schema. Arguments not listed are refused.
COMMANDS: dict[str, dict[str, ArgSpec]] = {
    "ping": {},
    "sync_time": {"time": ArgSpec(float, lo=1_735_689_600, hi=4_102_444_800)},  # 2025..2100
    "set_config": {"key": ArgSpec(str, max_len=64), "value": ArgSpec(str, max_len=256)},
    "read_now": {},
    "resend": {
        "first": ArgSpec(int, lo=1, hi=2**53),
        "last": ArgSpec(int, lo=1, hi=2**53),
    },
    "renew_certificate": {},
    "diagnostics": {"lines": ArgSpec(int, required=False, lo=1, hi=500)},
    "deprovision": {"force": ArgSpec(bool, required=False)},
    "reboot": {},
    # Signed release manifests (agent/wire/release.py), checked by the release key, not the command key.
    "update": {"manifest": ArgSpec(bytes), "previous": ArgSpec(bytes, required=False)},
}


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    id: str
    device_id: str
    type: str
    args: Mapping[str, Any]
    issued_at: float
    expires_at: float


def _finite(value: float) -> bool:
    """A finite number a float can hold (a CBOR bignum such as 10**400 cannot: OverflowError otherwise)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_args(ctype: str, args: Any) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise CommandRejected("bad_args", "args must be a map")
    schema = COMMANDS[ctype]
    unknown = set(args) - set(schema)
    if unknown:
        raise CommandRejected("bad_args", f"unknown argument(s) for {ctype}: {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in args:
            if spec.required:
                raise CommandRejected("bad_args", f"{ctype}: missing argument {name!r}")
            continue
        value = args[name]
        if spec.kind is float and isinstance(value, int) and not isinstance(value, bool) and _finite(value):
            value = float(value)
        if not isinstance(value, spec.kind) or (spec.kind is not bool and isinstance(value, bool)):
            raise CommandRejected("bad_args", f"{ctype}: {name} must be {spec.kind.__name__}")
        if isinstance(value, float) and not _finite(value):
            raise CommandRejected("bad_args", f"{ctype}: {name} must be finite")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            numeric
            and isinstance(value, int | float)
            and ((spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi))
        ):
            raise CommandRejected("bad_args", f"{ctype}: {name}={value} out of range {spec.lo}..{spec.hi}")
        if isinstance(value, str) and spec.max_len is not None and len(value) > spec.max_len:
            raise CommandRejected("bad_args", f"{ctype}: {name} longer than {spec.max_len}")
        out[name] = value
    if ctype == "resend" and out["first"] > out["last"]:
        raise CommandRejected("bad_args", "resend: first must not exceed last")
    return out


def encode_command(
    key: cose.PrivateKey,
    cmd_id: str,
    device_id: str,
    ctype: str,
    args: Mapping[str, Any],
    *,
    issued_at: int,
    expires_at: int,
) -> bytes:
    """The envelope the cloud sends. Arguments are not validated here: the box is the judge."""
    body = {"id": cmd_id, "dev": device_id, "type": ctype, "args": dict(args), "iat": issued_at, "exp": expires_at}
    return cose.sign1(key, cbor2.dumps(body, canonical=True))


def command_from_body(body: Mapping[Any, Any], device_id: str) -> Command:
    """Check the verified payload map of an envelope (shape, target, lifetime, arguments)."""
    cid, dev, ctype = body.get("id"), body.get("dev"), body.get("type")
    iat, exp = body.get("iat"), body.get("exp")
    if not isinstance(cid, str) or not ID_RE.match(cid):
        raise CommandRejected("malformed", "id must be 8-64 characters of [A-Za-z0-9_-]")
    if not isinstance(dev, str):
        raise CommandRejected("malformed", "dev must be a string")
    if dev != device_id:
        raise CommandRejected("wrong_device", f"command is for {dev!r}, not this device")
    if not isinstance(ctype, str) or ctype not in COMMANDS:
        raise CommandRejected("unknown_type", f"unknown command type {ctype!r}")
    for name, value in (("iat", iat), ("exp", exp)):
        if not isinstance(value, int | float) or isinstance(value, bool) or not _finite(value):
            raise CommandRejected("malformed", f"{name} must be a number")
    assert isinstance(iat, int | float) and isinstance(exp, int | float)
    if exp <= iat or exp - iat > MAX_LIFETIME_S:
        raise CommandRejected("malformed", "exp must follow iat by at most 30 days")
    args = _check_args(ctype, body.get("args", {}))
    return Command(cid, dev, ctype, args, float(iat), float(exp))


def verified_body(data: bytes, command_key: cose.PublicKey, max_bytes: int = MAX_COMMAND_BYTES) -> Mapping[Any, Any]:
    """Size, structure and signature (checked once), then the payload as a CBOR map. Raises CommandRejected."""
    if not isinstance(data, bytes | bytearray):
        raise CommandRejected("malformed", f"bytes expected, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CommandRejected("oversize", f"command of {len(data)} bytes exceeds {max_bytes}")
    try:
        cose.parse_sign1(data)
    except SignatureError as exc:  # not even a COSE_Sign1: garbage, not a forgery
        raise CommandRejected("malformed", f"not a COSE_Sign1: {exc}") from None
    try:
        verified = cose.verify1(data, lambda _kid: command_key)
    except SignatureError as exc:
        raise CommandRejected("bad_signature", str(exc)) from None
    try:
        body = cbor2.loads(verified.payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CommandRejected("malformed", f"payload is not CBOR: {exc}") from None
    if not isinstance(body, Mapping):
        raise CommandRejected("malformed", "payload must be a map")
    return body


def decode_command(data: bytes, command_key: cose.PublicKey, device_id: str) -> Command:
    """Verify and parse an envelope (pure: no clock, no journal). Raises CommandRejected."""
    return command_from_body(verified_body(data, command_key), device_id)


def check_expiry(cmd: Command, *, wall: float, clock_trusted: bool, cloud_floor: float) -> None:
    """The expiry rule (module docstring). Raises CommandRejected('expired').

    The cloud time floor applies whatever the clock says: a box whose clock is plausible but
    stale must not accept a command the cloud's own newer commands prove expired (journal
    entries are pruned after the longest lifetime, so this is what stops a late replay).
    """
    if cmd.expires_at < cloud_floor:
        raise CommandRejected("expired", "command expired (judged by the newest cloud time seen)")
    if clock_trusted:
        if cmd.expires_at < wall:
            raise CommandRejected("expired", f"command expired {wall - cmd.expires_at:.0f}s ago")
        if cmd.issued_at > wall + CLOCK_SKEW_S:
            raise CommandRejected("not_yet_valid", "command issued in the future by this box's clock")
