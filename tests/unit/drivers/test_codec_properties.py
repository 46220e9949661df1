"""Hypothesis properties: parsers never crash or invent readings; simulators round-trip over real ptys."""

from __future__ import annotations

import contextlib
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import contour_astm as ca
from drivers import onetouch_ultra2 as u2
from drivers import onetouch_ultraeasy as ue
from drivers.errors import DriverError
from drivers.models import GlucoseReading
from drivers.simulators.records import random_records

PROTOCOLS = (u2.PROTOCOL, ca.PROTOCOL, ue.PROTOCOL)
CODECS = {u2.PROTOCOL: u2, ca.PROTOCOL: ca, ue.PROTOCOL: ue}


def encode_stream(protocol: str, records: list[GlucoseReading]) -> bytes:
    """What the meter would send for these records (no link turnarounds)."""
    serial = records[0].meter_serial if records else "SERIAL1"
    if protocol == u2.PROTOCOL:
        return u2.encode_header(len(records), serial) + b"".join(u2.encode_record(r) for r in records)
    if protocol == ca.PROTOCOL:
        texts = [f"H|\\^&||pw|Bayer7410^1.0^{serial}^0|V=10600|{len(records)}|||||P|1|20260301120000", "P|1"]
        texts += [ca.encode_result(i, r) for i, r in enumerate(records, start=1)] + ["L|1||N"]
        return b"".join(ca.encode_frame(i + 1, t, final=i == len(texts) - 1) for i, t in enumerate(texts)) + ca.EOT
    packets = [ue.encode_packet(ue.REPLY_OK + serial.encode(), ue.link_bits(s=0))]
    packets += [ue.encode_packet(ue.encode_record(r), ue.link_bits(s=(i + 1) % 2)) for i, r in enumerate(records)]
    return b"".join(packets)


def essence(r: GlucoseReading) -> GlucoseReading:
    """A reading without what a capture may not know (serial, hence key) or what a read adds."""
    return dataclasses.replace(r, meter_serial="", record_key="-", clock_offset_s=None)


# --- pure parsers --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), protocol=st.sampled_from(PROTOCOLS))
def test_arbitrary_bytes_never_crash_a_decoder(data: bytes, protocol: str) -> None:
    decoded = CODECS[protocol].decode_capture(data)
    assert decoded.readings == () or all(isinstance(r, GlucoseReading) for r in decoded.readings)
    for fn in (u2.strip_checksum, ca.decode_frame, ue.decode_packet):
        with contextlib.suppress(DriverError):
            fn(data)


@settings(max_examples=300, deadline=None)
@given(
    protocol=st.sampled_from(PROTOCOLS),
    seed=st.integers(0, 2**16),
    count=st.integers(1, 12),
    mutation=st.sampled_from(["flip", "insert", "delete"]),
    where=st.floats(0, 1, exclude_max=True),
    byte=st.integers(0, 255),
)
def test_a_corrupted_stream_never_yields_an_unverified_reading(
    protocol: str, seed: int, count: int, mutation: str, where: float, byte: int
) -> None:
    records = random_records(protocol, count, seed=seed)
    stream = bytearray(encode_stream(protocol, records))
    assert CODECS[protocol].decode_capture(bytes(stream)).readings == tuple(records)
    at = int(where * len(stream))
    if mutation == "flip":
        stream[at] ^= byte or 0x01
    elif mutation == "insert":
        stream[at:at] = bytes([byte])
    else:
        del stream[at]
    decoded = CODECS[protocol].decode_capture(bytes(stream))
    originals = [essence(r) for r in records]
    assert all(essence(r) in originals for r in decoded.readings)
    header_hit = protocol == ca.PROTOCOL and at <= stream.index(b"\n")  # no header: no trustworthy limits
    if not header_hit:
        assert len(decoded.readings) >= count - 2  # one damaged unit (two if a separator was hit) is lost, no more


# --- simulator <-> driver over real ptys -------------------------------------------------------------------
