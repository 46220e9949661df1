"""The upload batch (agent/wire/batch.py): golden bytes, round trip, exact size, garbage refused cleanly."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.wire.batch import BatchError, batch_size, decode_batch, encode_batch

# Two records of 3 and 24 bytes: array(2), bytes(3) "abc", bytes(24) with a one-byte length.
GOLDEN = bytes.fromhex("82" "43616263" "5818") + b"x" * 24


def test_golden_bytes() -> None:
    assert encode_batch([b"abc", b"x" * 24]) == GOLDEN
    assert decode_batch(GOLDEN) == [b"abc", b"x" * 24]


@given(st.lists(st.binary(max_size=300), max_size=40))
def test_round_trip_and_exact_size(records: list[bytes]) -> None:
    payload = encode_batch(records)
    assert decode_batch(payload) == records
    assert batch_size([len(r) for r in records]) == len(payload)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff", cbor2.dumps({"a": 1}), cbor2.dumps(b"abc"), cbor2.dumps("text"), cbor2.dumps([b"x"] * 1001)],
)
def test_not_a_batch_is_refused_with_its_reason(payload: bytes) -> None:
    with pytest.raises(BatchError):
        decode_batch(payload)


@given(st.binary(max_size=200))
def test_garbage_is_a_batch_error_or_a_list(payload: bytes) -> None:
    with contextlib.suppress(BatchError):
        assert isinstance(decode_batch(payload), list)
