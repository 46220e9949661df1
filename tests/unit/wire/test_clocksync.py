"""The signed time message: only an answer to our own nonce, for our device, by the command key, is taken."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import SignatureError
from agent.wire import clocksync
from agent.wire.ack import encode_ack

DEV = "gd-000000000001"
NONCE = bytes(range(16))
T = 1_800_000_000.0


def test_a_reply_to_our_nonce_gives_the_time() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    assert clocksync.decode_time_request(clocksync.encode_time_request(NONCE)) == NONCE
    reply = clocksync.encode_time_reply(key, DEV, NONCE, T)
    assert clocksync.decode_time_reply(reply, key.public_key(), DEV, NONCE) == T


def test_an_ack_is_not_a_time_reply() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    assert clocksync.decode_time_reply(encode_ack(key, DEV, {"c": [1]}), key.public_key(), DEV, NONCE) is None


@pytest.mark.parametrize("case", ["replayed", "other-device", "other-key", "impossible-time"])
def test_refused(case: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    reply = {
        "replayed": clocksync.encode_time_reply(key, DEV, bytes(16), T),  # an old answer to another request
        "other-device": clocksync.encode_time_reply(key, "gd-000000000002", NONCE, T),
        "other-key": clocksync.encode_time_reply(ed25519.Ed25519PrivateKey.generate(), DEV, NONCE, T),
        "impossible-time": clocksync.encode_time_reply(key, DEV, NONCE, 0.0),
    }[case]
    with pytest.raises(SignatureError):
        clocksync.decode_time_reply(reply, key.public_key(), DEV, NONCE)


def test_records_of_the_anchored_boot_are_corrected_by_monotonic_time() -> None:
    boot = bytes(16)
    sample = clocksync.anchor_sample(T, boot, 500.0, 1.7e9)
    anchor = clocksync.anchor_of({f"health:{k}": v for k, v in sample.items()})
    assert anchor == (T, boot, 500.0)
    assert clocksync.corrected_time(boot, 380.0, anchor) == T - 120.0
    assert clocksync.corrected_time(b"\x01" * 16, 380.0, anchor) is None  # another boot: no correction
