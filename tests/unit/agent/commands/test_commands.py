"""Commands without I/O: envelope decoder, argument schema, expiry rule, result codec, redaction,
certificate deliveries, backend argument parsing, and the buffer's `resend` re-queue.

Hypothesis fuzzes the envelope decoder and the argument validation: whatever arrives, the
only exception ever raised is CommandRejected.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer.intake import Intake
from agent.buffer.store import CLINICAL, PRIO_RECORD, Store
from agent.commands.logring import LogRing, redact
from agent.config import SCHEMA, SETTABLE_KEYS
from agent.errors import CommandRejected
from agent.wire import cose
from agent.wire import renewal as wire_renewal
from agent.wire.command import COMMANDS, MAX_COMMAND_BYTES, Command, check_expiry, decode_command
from agent.wire.result import encode_result
from backend.commands import CommandError, parse_args, sign_command

KEY = ed25519.Ed25519PrivateKey.generate()
OTHER = ed25519.Ed25519PrivateKey.generate()
DEV = "gd-0123456789ab"
NOW = 1_800_000_000


def env(body: Any, key: ed25519.Ed25519PrivateKey = KEY) -> bytes:
    return cose.sign1(key, cbor2.dumps(body))


def body(ctype: str = "ping", args: Any = None, **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"id": "cmd-00000001", "dev": DEV, "type": ctype, "args": {} if args is None else args,
                         "iat": NOW, "exp": NOW + 600}  # fmt: skip
    b.update(over)
    return b


def rejected(data: bytes) -> str:
    with pytest.raises(CommandRejected) as info:
        decode_command(data, KEY.public_key(), DEV)
    return info.value.code


# --- the envelope ---------------------------------------------------------------------------------
VALID_ARGS: dict[str, dict[str, Any]] = {
    "ping": {},
    "sync_time": {"time": NOW},
    "set_config": {"key": "alerts.hypo_mgdl", "value": "80"},
    "read_now": {},
    "resend": {"first": 1, "last": 10},
    "renew_certificate": {},
    "diagnostics": {"lines": 20},
    "deprovision": {"force": True},
    "reboot": {},
    "update": {"manifest": b"a signed release manifest (checked by the handler, with the release key)"},
}


@pytest.mark.parametrize("ctype", sorted(COMMANDS))
def test_every_command_type_decodes(ctype: str) -> None:
    cmd = decode_command(env(body(ctype, VALID_ARGS[ctype])), KEY.public_key(), DEV)
    assert (cmd.id, cmd.device_id, cmd.type, cmd.issued_at, cmd.expires_at) == ("cmd-00000001", DEV, ctype, NOW, NOW + 600)
    assert dict(cmd.args) == VALID_ARGS[ctype]


def test_backend_signed_commands_decode_on_the_box() -> None:
    cid, data = sign_command(KEY, DEV, "resend", {"first": 3, "last": 4}, ttl_s=60, now=NOW)
    cmd = decode_command(data, KEY.public_key(), DEV)
    assert (cmd.id, cmd.type, dict(cmd.args), cmd.expires_at - cmd.issued_at) == (cid, "resend", {"first": 3, "last": 4}, 60)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00" * (MAX_COMMAND_BYTES + 1), "oversize"),
        (b"\xa1\x61", "malformed"),  # truncated CBOR
        (cbor2.dumps(body()), "malformed"),  # no COSE at all
        (cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -8}), {}, cbor2.dumps(body()), b""])), "bad_signature"),
        (env(body(), OTHER), "bad_signature"),
        (cose.sign1(KEY, b"\xff\xff"), "malformed"),  # signed, but not CBOR inside
        (env([1, 2, 3]), "malformed"),
        (env(body(id="short")), "malformed"),
        (env(body(id="bad id with spaces")), "malformed"),
        (env(body(dev="gd-ffffffffffff")), "wrong_device"),
        (env(body(dev=7)), "malformed"),
        (env(body("self_destruct")), "unknown_type"),
        (env(body(iat="now")), "malformed"),
        (env(body(exp=float("nan"))), "malformed"),
        (env(body(exp=10**400)), "malformed"),  # a bignum: no OverflowError
        (env(body(exp=NOW)), "malformed"),  # exp must follow iat
        (env(body(exp=NOW + 31 * 86_400)), "malformed"),  # at most 30 days
        (env(body(args=[1])), "bad_args"),
        (env(body(args={"x": 1})), "bad_args"),
        (env(body("sync_time", {})), "bad_args"),
        (env(body("sync_time", {"time": "soon"})), "bad_args"),
        (env(body("sync_time", {"time": 10**400})), "bad_args"),
        (env(body("sync_time", {"time": float("inf")})), "bad_args"),
        (env(body("sync_time", {"time": 1_000})), "bad_args"),  # before 2025
        (env(body("resend", {"first": 0, "last": 3})), "bad_args"),
        (env(body("resend", {"first": 5, "last": 3})), "bad_args"),
        (env(body("resend", {"first": True, "last": 3})), "bad_args"),
        (env(body("diagnostics", {"lines": 501})), "bad_args"),
        (env(body("deprovision", {"force": 1})), "bad_args"),
        (env(body("set_config", {"key": "k" * 65, "value": "v"})), "bad_args"),
    ],
    # ids that do not hold the signatures (made with a fresh key each run): pytest-xdist's workers must
    # collect the same names
    ids=lambda v: v if isinstance(v, str) else f"{len(v)}B",
)
def test_bad_envelopes_are_refused_with_a_code(data: bytes, code: str) -> None:
    assert rejected(data) == code


# --- the expiry rule ------------------------------------------------------------------------------
def cmd(iat: float, exp: float) -> Command:
    return Command("cmd-00000001", DEV, "ping", {}, iat, exp)


def test_expiry_with_a_trusted_clock_uses_the_wall_clock() -> None:
    check_expiry(cmd(NOW, NOW + 60), wall=NOW + 30, clock_trusted=True, cloud_floor=0)
    with pytest.raises(CommandRejected, match="expired"):
        check_expiry(cmd(NOW, NOW + 60), wall=NOW + 61, clock_trusted=True, cloud_floor=0)
    with pytest.raises(CommandRejected) as info:
        check_expiry(cmd(NOW + 3600, NOW + 7200), wall=NOW, clock_trusted=True, cloud_floor=0)
    assert info.value.code == "not_yet_valid"


def test_expiry_with_an_unset_clock_uses_the_newest_cloud_time_seen() -> None:
    # The box believes it is 1970: the wall clock says nothing; the floor (highest verified iat) decides.
    check_expiry(cmd(NOW, NOW + 60), wall=0, clock_trusted=False, cloud_floor=NOW + 59)
    with pytest.raises(CommandRejected) as info:
        check_expiry(cmd(NOW, NOW + 60), wall=0, clock_trusted=False, cloud_floor=NOW + 61)
    assert info.value.code == "expired"


def test_the_cloud_floor_applies_even_to_a_plausible_but_stale_clock() -> None:
    """A replay of a command whose journal entry was pruned, on a box whose clock is 20 days behind."""
    day = 86_400
    old = cmd(NOW - 40 * day, NOW - 10 * day)
    with pytest.raises(CommandRejected) as info:
        check_expiry(old, wall=NOW - 20 * day, clock_trusted=True, cloud_floor=NOW)
    assert info.value.code == "expired"


def test_results_round_trip() -> None:
    raw = encode_result("cmd-00000001", DEV, "ok", "pong", "fine", {"n": 1, "b": b"\x00"})
    assert cbor2.loads(raw) == {"id": "cmd-00000001", "dev": DEV, "status": "ok", "code": "pong", "message": "fine",
                                "data": {"n": 1, "b": b"\x00"}}  # fmt: skip
    assert raw == encode_result("cmd-00000001", DEV, "ok", "pong", "fine", {"b": b"\x00", "n": 1})  # canonical


# --- fuzzing --------------------------------------------------------------------------------------
cbor_leaf = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20) | st.integers(min_value=10**300, max_value=10**400)
)  # fmt: skip
cbor_value = st.recursive(cbor_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
FIELDS = ("id", "dev", "type", "args", "iat", "exp")


@st.composite
def bodies(draw: st.DrawFn) -> Any:
    """Mostly well-formed envelopes with some fields replaced by anything, plus anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(cbor_value)
    ctype = draw(st.sampled_from([*sorted(COMMANDS), "nope"]))
    b = body(ctype, VALID_ARGS.get(ctype, {}))
    for name in draw(st.sets(st.sampled_from(FIELDS))):
        b[name] = draw(cbor_value)
    if draw(st.booleans()) and isinstance(b.get("args"), dict):
        b["args"] = {**b["args"], **draw(st.dictionaries(st.sampled_from(["time", "first", "last", "key", "value", "lines", "force", "x"]), cbor_value, max_size=3))}
    return b


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_ever_raise_command_rejected(data: bytes) -> None:
    with pytest.raises(CommandRejected):
        decode_command(data, KEY.public_key(), DEV)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_fuzz_signed_bodies_decode_or_are_refused(b: Any) -> None:
    try:
        cmd = decode_command(env(b), KEY.public_key(), DEV)
    except CommandRejected as exc:
        assert exc.code in {"malformed", "wrong_device", "unknown_type", "bad_args"}
        return
    assert cmd.type in COMMANDS and cmd.device_id == DEV and cmd.expires_at > cmd.issued_at


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_fuzz_corrupted_envelopes_never_verify(tail: bytes, pos: int, flip: int) -> None:
    good = bytearray(env(body()))
    if flip:
        good[pos % len(good)] ^= flip
        try:
            decode_command(bytes(good), KEY.public_key(), DEV)
        except CommandRejected:
            return
        pytest.fail("a corrupted envelope was accepted")  # Ed25519: no byte flip keeps a valid signature
    with pytest.raises(CommandRejected):
        decode_command(bytes(good) + tail + b"\x00", KEY.public_key(), DEV)  # trailing bytes


@settings(max_examples=300)
@given(bodies())
def test_fuzz_certificate_deliveries_only_raise_command_rejected(b: Any) -> None:
    if isinstance(b, dict) and b.pop("id", None) is not None:
        b[wire_renewal.DELIVERY_KEY] = "cmd-00000001"
        b["cert"] = b.get("args") if isinstance(b.get("args"), bytes) else b"pem"
    try:
        d = wire_renewal.decode_delivery(env(b), KEY.public_key(), DEV)
    except CommandRejected:
        return
    assert isinstance(d.cert_pem, bytes) and d.renewal == "cmd-00000001"


def test_delivery_signed_by_another_key_is_refused() -> None:
    b = {wire_renewal.DELIVERY_KEY: "cmd-00000001", "dev": DEV, "cert": b"pem", "iat": NOW, "exp": NOW + 60}
    assert wire_renewal.decode_delivery(env(b), KEY.public_key(), DEV).cert_pem == b"pem"
    with pytest.raises(CommandRejected):
        wire_renewal.decode_delivery(env(b, OTHER), KEY.public_key(), DEV)
    with pytest.raises(CommandRejected):
        wire_renewal.decode_delivery(env({**b, "dev": "gd-ffffffffffff"}), KEY.public_key(), DEV)


# --- backend CLI arguments, configuration, redaction --------------------------------------------------
def test_backend_parses_typed_arguments() -> None:
    assert parse_args("resend", ["first=1", "last=9"]) == {"first": 1, "last": 9}
    assert parse_args("sync_time", ["time=1800000000.5"]) == {"time": 1800000000.5}
    assert parse_args("deprovision", ["force=true"]) == {"force": True}
    assert parse_args("set_config", ["key=alerts.hypo_mgdl", "value=a=b"]) == {"key": "alerts.hypo_mgdl", "value": "a=b"}
    for ctype, words in (("resend", ["first=x"]), ("ping", ["x=1"]), ("nope", []), ("resend", ["first"]), ("deprovision", ["force=maybe"])):
        with pytest.raises(CommandError):
            parse_args(ctype, words)


def test_system_commands_are_configurable_but_never_settable_remotely() -> None:
    assert SCHEMA["agent"]["settime_command"]("/usr/bin/settime {epoch}") == "/usr/bin/settime {epoch}"
    with pytest.raises(ValueError, match="epoch"):
        SCHEMA["agent"]["settime_command"]("date -s now")
    with pytest.raises(ValueError):
        SCHEMA["agent"]["reboot_command"]("'unterminated")
    assert {"agent.settime_command", "agent.reboot_command", "agent.state_dir"}.isdisjoint(SETTABLE_KEYS)
    assert {"update.install_command", "update.status_file", "update.package"}.isdisjoint(SETTABLE_KEYS)
    assert "alerts.hypo_mgdl" in SETTABLE_KEYS


def test_redaction_removes_key_material_tokens_and_patient_references() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----"
    line = redact(f"loaded {pem} token=ABCD2345EFGH6789 patient: p-7731 ok")
    assert "MC4CAQ" not in line and "ABCD2345" not in line and "p-7731" not in line and "ok" in line
    ring = LogRing(capacity=3)
    import logging

    logger = logging.getLogger("test.ring")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    for i in range(5):
        logger.info("line %d secret=hunter%d", i, i)
    assert [ln.split(": ", 1)[1] for ln in ring.tail(10)] == [f"line {i} secret=[redacted]" for i in (2, 3, 4)]
    logger.removeHandler(ring)


# --- resend: re-queue what is retained ------------------------------------------------------------
def test_requeue_makes_acked_rows_pending_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "buffer.db", max_records=100, retention_s=3600)
    try:
        items = [Intake("reading", PRIO_RECORD, lambda seq: f"r{seq}".encode()) for _ in range(5)]
        assert store.accept(items) == [1, 2, 3, 4, 5]
        assert store.ack(CLINICAL, [1, 2, 3, 4], now=time.time()) == 4
        assert [r.seq for r in store.pending(10)] == [5]
        assert store.requeue(CLINICAL, 2, 10) == 3  # 2..4 were acked; 5 is still pending
        assert [r.seq for r in store.pending(10)] == [2, 3, 4, 5]
        assert store.requeue(CLINICAL, 2, 10) == 0
        assert store.requeue(CLINICAL, 50, 60) == 0
    finally:
        store.close()
