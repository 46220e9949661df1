"""The command result: exact bytes of the payload and of the signed result, round trip, garbage refused."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import CMD_ID, DEV, KEY, OTHER, RESULT_PAYLOAD, RESULT_SIGNED

from agent.errors import SignatureError
from agent.wire import cose, result

KID = cose.key_id(KEY.public_key())


def _keys(kid: bytes | None) -> cose.PublicKey | None:
    return KEY.public_key() if kid == KID else None


def test_result_is_byte_exact() -> None:
    payload = result.encode_result(CMD_ID, DEV, "ok", "resent", "9 records queued", {"queued": 9})
    assert payload == RESULT_PAYLOAD
    assert cose.sign1(KEY, payload, kid=KID) == RESULT_SIGNED


def test_round_trip() -> None:
    assert result.decode_result(RESULT_SIGNED, _keys, DEV) == result.Result(
        CMD_ID, DEV, "ok", "resent", "9 records queued", {"queued": 9}
    )


def test_refusals() -> None:
    with pytest.raises(SignatureError, match="names device"):
        result.decode_result(RESULT_SIGNED, _keys, "gd-ffffffffffff")
    forged = cose.sign1(OTHER, RESULT_PAYLOAD, kid=KID)
    with pytest.raises(SignatureError, match="does not verify"):
        result.decode_result(forged, _keys, DEV)
    bad_status = cose.sign1(KEY, result.encode_result(CMD_ID, DEV, "great", "x", "y"), kid=KID)
    with pytest.raises(SignatureError, match="malformed"):
        result.decode_result(bad_status, _keys, DEV)


_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=6)
_body = st.dictionaries(
    st.sampled_from(["id", "dev", "status", "code", "message", "data"]) | st.text(max_size=4),
    _leaf | st.just(DEV) | st.sampled_from(result.STATUSES) | st.dictionaries(st.text(max_size=3), _leaf),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | _leaf.map(cbor2.dumps) | _body.map(cbor2.dumps))
def test_random_input_is_refused_cleanly(payload: bytes) -> None:
    for data in (payload, cose.sign1(KEY, payload, kid=KID)):
        with contextlib.suppress(SignatureError):
            result.decode_result(data, _keys, DEV)
