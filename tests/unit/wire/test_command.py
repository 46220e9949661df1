"""The command envelope: exact bytes, round trip (Ed25519 and ES256), garbage refused cleanly."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import CMD_ID, COMMAND, DEV, KEY, NOW, OTHER

from agent.errors import CommandRejected
from agent.wire import command, cose


def test_envelope_is_byte_exact() -> None:
    env = command.encode_command(
        KEY, CMD_ID, DEV, "resend", {"first": 1, "last": 9}, issued_at=NOW, expires_at=NOW + 600
    )
    assert env == COMMAND


def test_round_trip() -> None:
    cmd = command.decode_command(COMMAND, KEY.public_key(), DEV)
    assert cmd == command.Command(CMD_ID, DEV, "resend", {"first": 1, "last": 9}, float(NOW), float(NOW + 600))


def test_es256_round_trip() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    env = command.encode_command(key, CMD_ID, DEV, "ping", {}, issued_at=NOW, expires_at=NOW + 60)
    assert command.decode_command(env, key.public_key(), DEV).type == "ping"
    with pytest.raises(CommandRejected) as err:
        command.decode_command(env, ec.generate_private_key(ec.SECP256R1()).public_key(), DEV)
    assert err.value.code == "bad_signature"


@pytest.mark.parametrize(
    ("envelope", "code"),
    [
        (COMMAND, None),
        (COMMAND[:-1] + bytes([COMMAND[-1] ^ 1]), "bad_signature"),
        (b"\x00" * (command.MAX_COMMAND_BYTES + 1), "oversize"),
        (b"garbage", "malformed"),
        (cose.sign1(KEY, b"\xff"), "malformed"),
        (cose.sign1(KEY, cbor2.dumps([1])), "malformed"),
    ],
)
def test_refusal_codes(envelope: bytes, code: str | None) -> None:
    if code is None:
        assert command.decode_command(envelope, KEY.public_key(), DEV).id == CMD_ID
        return
    with pytest.raises(CommandRejected) as err:
        command.decode_command(envelope, KEY.public_key(), DEV)
    assert err.value.code == code


def test_other_key_and_other_device_are_refused() -> None:
    with pytest.raises(CommandRejected, match="signature"):
        command.decode_command(COMMAND, OTHER.public_key(), DEV)
    with pytest.raises(CommandRejected) as err:
        command.decode_command(COMMAND, KEY.public_key(), "gd-ffffffffffff")
    assert err.value.code == "wrong_device"


_leaf = st.none() | st.booleans() | st.integers() | st.just(10**400) | st.floats() | st.text(max_size=6)
_body = st.fixed_dictionaries(
    {},
    optional={
        "id": _leaf | st.just(CMD_ID),
        "dev": _leaf | st.just(DEV),
        "type": _leaf | st.sampled_from(sorted(command.COMMANDS)),
        "args": st.dictionaries(st.text(max_size=6) | st.sampled_from(["first", "last", "time", "key"]), _leaf),
        "iat": _leaf,
        "exp": _leaf,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | _body.map(lambda b: cose.sign1(KEY, cbor2.dumps(b))))
def test_random_input_is_refused_cleanly(envelope: bytes) -> None:
    with contextlib.suppress(CommandRejected):
        command.decode_command(envelope, KEY.public_key(), DEV)
