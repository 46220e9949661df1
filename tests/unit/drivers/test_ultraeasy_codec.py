"""OneTouch UltraEasy: CRC and packets with literal bytes, every vector, link retries over real ptys."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import pytest

from drivers import onetouch_ultraeasy as ue
from drivers.errors import InvalidChecksum, InvalidResponse, MissingChecksum
from drivers.models import RangeFlag


def test_crc_literals() -> None:
    assert ue.crc_ccitt(b"\x02\x06\x06\x03") == 0x41CD
    assert ue.crc_ccitt(b"123456789") == 0x29B1


def test_packet_literals() -> None:
    assert ue.encode_packet(b"", ue.link_bits(disc=True)) == bytes.fromhex("02060803c262")
    assert ue.encode_packet(ue.REQ_VERSION, ue.link_bits(s=1, e=1)) == bytes.fromhex("020903050d0203089f")
    p = ue.decode_packet(bytes.fromhex("020903050d0203089f"))
    assert (p.s, p.link & ue.LINK_E, p.ack, p.disc, p.message) == (1, ue.LINK_E, False, False, b"\x05\x0d\x02")


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (bytes.fromhex("020903050d0203089e"), InvalidChecksum),
        (bytes.fromhex("020903050d0204089f"), MissingChecksum),
        (bytes.fromhex("020a03050d0203089f"), InvalidResponse),
        (bytes.fromhex("0206"), MissingChecksum),
    ],
)
def test_bad_packets(wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        ue.decode_packet(wire)


def test_records_hi_lo_and_time() -> None:
    when = dt.datetime(2015, 6, 1, 7, 30, 5)
    raw_time = struct.pack("<I", ue.encode_time(when))
    r = ue.decode_record(b"\x05\x06" + raw_time + b"\x78\x00\x00\x00", "S")
    hi = ue.decode_record(b"\x05\x06" + raw_time + b"\xff\xff\x00\x00", "S")
    lo = ue.decode_record(b"\x05\x06" + raw_time + b"\xfe\xff\x00\x00", "S")
    assert (r.meter_time, r.value_mgdl, r.native_value) == (when, 120, "120")
    assert (hi.range_flag, hi.value_mgdl, hi.native_value) == (RangeFlag.HIGH, 600, "HI")
    assert (lo.range_flag, lo.value_mgdl, lo.native_value) == (RangeFlag.LOW, 20, "LO")
    with pytest.raises(InvalidResponse):
        ue.decode_record(b"\x05\x06" + raw_time + b"\x00\x10\x00\x00", "S")  # 4096 mg/dL
    assert ue.decode_count(b"\x05\x0f\xf4\x01") == 500
    assert ue.decode_version(b"\x05\x06\x0803.04.00") == "03.04.00"
    assert ue.decode_serial(b"\x05\x06C2X8ZB6FY\x00") == "C2X8ZB6FY"


def test_vectors(vectors: Any) -> None:
    doc = vectors.json("onetouch-ultraeasy", "packets.json")
    for v in doc["crc"]["vectors"]:
        data = bytes.fromhex(v["input_hex"]) if "input_hex" in v else v["input_ascii"].encode()
        assert ue.crc_ccitt(data) == int(v["crc"], 16)
    for v in doc["packets"]:
        wire = bytes.fromhex(v["hex"])
        p = ue.decode_packet(wire)
        assert p.message == bytes.fromhex(v["fields"]["message"].replace(" ", ""))
        assert p.link == int(v["fields"]["link_control"].split()[0], 16) and wire[1] == v["fields"]["length"]
        assert ue.encode_packet(p.message, p.link) == wire
    messages = doc["command_messages_from_sources"]
    assert bytes.fromhex(messages["read_version"]) == ue.REQ_VERSION
    assert bytes.fromhex(messages["read_rtc"].split("->")[0]) == ue.REQ_CLOCK
    assert bytes.fromhex(messages["read_serial"].split("(")[0]) == ue.REQ_SERIAL
    assert ue.encode_request_record(ue.COUNT_INDEX) == bytes.fromhex(messages["record_count"].split("(")[0])
    assert int(next(k for k, v in doc["link_control_bits"].items() if v.startswith("DISC")), 16) == ue.LINK_DISC
