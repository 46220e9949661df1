"""One classification of what arrives on the commands topic, with the signature checked once."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import CMD_ID, COMMAND, DELIVERY, DEV, KEY, NOW, OTHER

from agent.wire import command, cose, inbound, renewal


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Counts signature checks (the real verify1 still runs)."""
    calls: list[bytes] = []
    real = cose.verify1

    def counting(data: bytes, *args: object, **kwargs: object) -> cose.Verified:
        calls.append(data)
        return real(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cose, "verify1", counting)
    return calls


def test_command(verifications: list[bytes]) -> None:
    got = inbound.classify(COMMAND, KEY.public_key(), DEV)
    assert isinstance(got, command.Command) and got.id == CMD_ID
    assert len(verifications) == 1


def test_delivery(verifications: list[bytes]) -> None:
    assert inbound.classify(DELIVERY, KEY.public_key(), DEV) == renewal.Delivery(
        CMD_ID, b"-----BEGIN CERTIFICATE-----\n"
    )
    assert len(verifications) == 1


@pytest.mark.parametrize(
    ("payload", "key", "dev", "code", "cmd_id", "is_delivery"),
    [
        (COMMAND, OTHER, DEV, "bad_signature", "", False),  # forged: nothing in it is believed, not even its id
        (b"\x00" * 20_000, KEY, DEV, "oversize", "", False),
        (b"garbage", KEY, DEV, "malformed", "", False),
        (COMMAND, KEY, "gd-ffffffffffff", "wrong_device", CMD_ID, False),  # verified: its id is reported
        (DELIVERY, KEY, "gd-ffffffffffff", "wrong_device", "", True),
        (
            command.encode_command(KEY, CMD_ID, DEV, "fly", {}, issued_at=NOW, expires_at=NOW + 60),
            KEY, DEV, "unknown_type", CMD_ID, False,
        ),
    ],
)  # fmt: skip
def test_refusals_verify_once(
    verifications: list[bytes], payload: bytes, key: object, dev: str, code: str, cmd_id: str, is_delivery: bool
) -> None:
    got = inbound.classify(payload, key.public_key(), dev)  # type: ignore[attr-defined]
    assert isinstance(got, inbound.Refusal)
    assert (got.code, got.cmd_id, got.delivery) == (code, cmd_id, is_delivery)
    assert len(verifications) <= 1


_leaf = st.none() | st.booleans() | st.integers() | st.just(10**400) | st.floats() | st.text(max_size=6)
_body = st.dictionaries(
    st.sampled_from(["id", "dev", "type", "args", "iat", "exp", renewal.DELIVERY_KEY, "cert"]),
    _leaf | st.just(DEV) | st.just(CMD_ID) | st.binary(max_size=6) | st.dictionaries(st.text(max_size=4), _leaf),
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120) | _leaf.map(cbor2.dumps) | _body.map(lambda b: cose.sign1(KEY, cbor2.dumps(b))))
def test_random_input_never_raises(payload: bytes) -> None:
    got = inbound.classify(payload, KEY.public_key(), DEV)
    assert isinstance(got, command.Command | renewal.Delivery | inbound.Refusal)
