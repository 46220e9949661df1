"""The cloud's signed ack: exact bytes, round trip, garbage refused cleanly."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import ACK, DEV, KEY, OTHER

from agent.errors import SignatureError
from agent.wire import ack, cose


def test_ack_is_byte_exact() -> None:
    assert ack.encode_ack(KEY, DEV, {"c": [1, 2, 3], "h": [7]}) == ACK


def test_round_trip() -> None:
    assert ack.decode_ack(ACK, KEY.public_key(), DEV) == {"c": [1, 2, 3], "h": [7]}
    assert ack.decode_ack(ack.encode_ack(KEY, DEV, {"c": [5]}), KEY.public_key(), DEV) == {"c": [5], "h": []}


def test_refusals() -> None:
    with pytest.raises(SignatureError, match="not addressed"):
        ack.decode_ack(ACK, KEY.public_key(), "gd-ffffffffffff")
    with pytest.raises(SignatureError, match="does not verify"):
        ack.decode_ack(ACK, OTHER.public_key(), DEV)
    with pytest.raises(SignatureError, match="list of integers"):
        ack.decode_ack(cose.sign1(KEY, cbor2.dumps({"dev": DEV, "c": [True]})), KEY.public_key(), DEV)


_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=6)
_body = st.dictionaries(st.sampled_from(["dev", "c", "h"]), _leaf | st.just(DEV) | st.lists(_leaf, max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | _leaf.map(cbor2.dumps) | _body.map(cbor2.dumps))
def test_random_input_is_refused_cleanly(payload: bytes) -> None:
    for data in (payload, cose.sign1(KEY, payload)):
        with contextlib.suppress(SignatureError):
            ack.decode_ack(data, KEY.public_key(), DEV)
