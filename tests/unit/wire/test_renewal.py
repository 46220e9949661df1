"""Certificate delivery and recovery request: exact bytes, round trip, garbage refused cleanly."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import CERT, CMD_ID, CSR, DELIVERY, DEV, KEY, NOW, OTHER, RECOVERY, REQ_ID

from agent.errors import CommandRejected
from agent.wire import cose, renewal

KID = cose.key_id(KEY.public_key())


def _keys(kid: bytes | None) -> cose.PublicKey | None:
    return KEY.public_key() if kid == KID else None


def test_delivery_is_byte_exact_and_round_trips() -> None:
    env = renewal.encode_delivery(KEY, CMD_ID, DEV, CERT, issued_at=NOW, expires_at=NOW + 300)
    assert env == DELIVERY
    assert renewal.decode_delivery(DELIVERY, KEY.public_key(), DEV) == renewal.Delivery(CMD_ID, CERT)


def test_delivery_refusals() -> None:
    for data, key, dev, code in [
        (DELIVERY, OTHER, DEV, "bad_signature"),
        (DELIVERY, KEY, "gd-ffffffffffff", "wrong_device"),
        (b"\x00" * (renewal.MAX_DELIVERY_BYTES + 1), KEY, DEV, "oversize"),
        (cose.sign1(KEY, cbor2.dumps({"id": CMD_ID})), KEY, DEV, "malformed"),
        (cose.sign1(KEY, b"\xff"), KEY, DEV, "malformed"),
    ]:
        with pytest.raises(CommandRejected) as err:
            renewal.decode_delivery(data, key.public_key(), dev)
        assert err.value.code == code


def test_recovery_request_is_byte_exact_and_round_trips() -> None:
    request = renewal.encode_recovery_request(REQ_ID, DEV, KEY, CSR, NOW + 0.9)
    assert request == RECOVERY
    outer = cbor2.loads(RECOVERY)
    assert (outer["v"], outer["req"]) == (1, REQ_ID)
    got = renewal.decode_recovery(outer[renewal.RECOVER_KEY], REQ_ID, _keys)
    assert got == renewal.RecoveryRequest(DEV, CSR, KID)


def test_recovery_refusals() -> None:
    signed = cbor2.loads(RECOVERY)[renewal.RECOVER_KEY]
    inner = cose.parse_sign1(signed)[3]
    cases: list[tuple[object, str, str]] = [
        ("not bytes", REQ_ID, "bad_request"),
        (b"garbage", REQ_ID, "bad_signature"),
        (signed, "r-another-request-id", "bad_request"),
        (cose.sign1(OTHER, inner, kid=KID), REQ_ID, "bad_signature"),
        (cose.sign1(KEY, cbor2.dumps({"dev": "NOT A DEVICE"}), kid=KID), REQ_ID, "bad_request"),
        (cose.sign1(KEY, cbor2.dumps({"req": REQ_ID}), kid=KID), REQ_ID, "bad_signature"),
    ]
    for data, req, code in cases:
        with pytest.raises(renewal.RecoveryRefused) as err:
            renewal.decode_recovery(data, req, _keys)
        assert err.value.code == code


_leaf = st.none() | st.booleans() | st.integers() | st.just(10**400) | st.floats() | st.text(max_size=6)
_body = st.dictionaries(
    st.sampled_from([renewal.DELIVERY_KEY, "dev", "cert", "exp", "req", "csr"]),
    _leaf | st.just(DEV) | st.just(REQ_ID) | st.binary(max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | _leaf.map(cbor2.dumps) | _body.map(cbor2.dumps))
def test_random_input_is_refused_cleanly(payload: bytes) -> None:
    for data in (payload, cose.sign1(KEY, payload, kid=KID)):
        with contextlib.suppress(CommandRejected):
            renewal.decode_delivery(data, KEY.public_key(), DEV)
        with contextlib.suppress(renewal.RecoveryRefused):
            renewal.decode_recovery(data, REQ_ID, _keys)
