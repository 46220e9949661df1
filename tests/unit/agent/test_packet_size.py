"""PUBLISH sizes as the broker's Maximum Packet Size counts them, and the upload batch's exact CBOR size
(the real broker checks the same figures in tests/system/test_max_packet_size.py)."""

from __future__ import annotations

from agent.buffer.store import CLINICAL, OutboxRow
from agent.link.mqtt import max_publish_payload, publish_packet_size
from agent.wire.batch import batch_size, encode_batch


def test_packet_size_arithmetic() -> None:
    # 0x30-ish byte, Remaining Length, topic length + topic, packet id, properties length, payload
    assert publish_packet_size("a/b", 10) == 1 + 1 + (2 + 3 + 2 + 1 + 10)
    assert publish_packet_size("a/b", 10, qos=0, v5=False) == 1 + 1 + (2 + 3 + 10)
    assert publish_packet_size("t", 200) == 1 + 2 + (2 + 1 + 2 + 1 + 200)  # Remaining Length >= 128: 2 bytes
    for limit in (32, 127, 128, 129, 130, 16_384, 16_390, 2_097_160):
        best = max_publish_payload(limit, "gluco/v1/dev/x/telemetry")
        assert publish_packet_size("gluco/v1/dev/x/telemetry", best) <= limit
        assert publish_packet_size("gluco/v1/dev/x/telemetry", best + 1) > limit
    assert max_publish_payload(31, "gluco/v1/dev/x/telemetry") == 0  # room for the header alone
    assert max_publish_payload(5, "gluco/v1/dev/x/telemetry") == -1
    rows = [b"x" * n for n in (1, 23, 24, 255, 256, 70_000)]
    assert batch_size([len(r) for r in rows]) == len(encode_batch(rows))


def _row(cose: bytes) -> OutboxRow:
    return OutboxRow(1, CLINICAL, 1, "reading", cose)
