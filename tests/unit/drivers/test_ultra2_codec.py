"""OneTouch Ultra 2: codec with literal bytes, every vector, and the driver over a real pty."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from drivers import onetouch_ultra2 as u2
from drivers.errors import InvalidChecksum, MeterNotReady, MissingChecksum
from drivers.models import Meal, RangeFlag


# --- pure codec, literal bytes ------------------------------------------------------------------
def test_checksum_vectors_from_glucometerutils() -> None:
    assert u2.checksum(b"T") == 0x0054
    assert u2.checksum(b'T "SAT","08/03/13","22:12:00   "') == 0x0608


def test_command_framing_matches_capture() -> None:
    assert u2.encode_command(u2.CMD_SERIAL) == bytes.fromhex("110d444d400d")
    assert u2.encode_command(u2.CMD_DUMP) == bytes.fromhex("110d444d500d")


def test_record_line_all_fields() -> None:
    r = u2.decode_record(u2.strip_checksum(b'P "SAT","03/21/15","16:42:11   ","  105 ","B","02", 00 099F\r\n'), "X1")
    assert (r.meter_time, r.value_mgdl, r.meal, r.comment) == (
        dt.datetime(2015, 3, 21, 16, 42, 11),
        105,
        Meal.BEFORE,
        "Too Much Food",
    )
    assert not r.control_solution and not r.suspect and r.range_flag is RangeFlag.IN_RANGE


@pytest.mark.parametrize(
    ("field", "value", "flag", "control", "suspect"),
    [
        (" HIGH ", 600, RangeFlag.HIGH, False, False),
        ("CHIGH ", 600, RangeFlag.HIGH, True, False),
        ("C 120 ", 120, RangeFlag.IN_RANGE, True, False),
        ("K 120 ", 120, RangeFlag.IN_RANGE, True, False),
        ("  077?", 77, RangeFlag.IN_RANGE, False, True),
    ],
)
def test_result_field_variants(field: str, value: int, flag: RangeFlag, control: bool, suspect: bool) -> None:
    line = u2.encode_line(f'P "SAT","03/21/15","16:42:11   ","{field}","A","11", 00'.encode())
    r = u2.decode_record(u2.strip_checksum(line), "X1")
    assert (r.value_mgdl, r.range_flag, r.control_solution, r.suspect, r.meal, r.comment) == (
        value,
        flag,
        control,
        suspect,
        Meal.AFTER,
        "Other",
    )


def test_encode_record_is_inverse_of_decode() -> None:
    line = b'P "SAT","03/21/15","16:45:24   ","  081 ","N","03", 00 09B6\r\n'
    assert u2.encode_record(u2.decode_record(u2.strip_checksum(line), "S")) == line


def test_not_switched_off_reply() -> None:
    with pytest.raises(MeterNotReady):
        u2.strip_checksum(b"\x00")


def test_non_printable_payload_rejected_even_with_matching_sum() -> None:
    payload = b'@ "HAXG\x00R4PV"'  # a NUL does not change a sum checksum
    with pytest.raises(MissingChecksum):
        u2.strip_checksum(u2.encode_line(payload))


# --- vectors --------------------------------------------------------------------------------------
def test_every_line_vector(vectors: Any) -> None:
    for v in vectors.json("onetouch-ultra2", "lines.json")["vectors"]:
        text = u2.strip_checksum(bytes.fromhex(v["wire_hex"]))
        exp = v["expected"]
        assert u2.checksum(text.encode()) == exp["checksum_int"]
        if exp["kind"] == "dmp_header":
            h = u2.decode_header(text)
            assert (h.count, h.serial, h.unit) == (exp["record_count"], exp["serial_number"], exp["unit_field"])
        elif exp["kind"] == "glucose_record":
            r = u2.decode_record(text, "S")
            assert r.meter_time.isoformat() == exp["timestamp_local"]
            assert r.value_mgdl == exp["value_mgdl"] and r.control_solution == exp["control_solution"]
            assert (r.range_flag is RangeFlag.HIGH) == exp["high"] and r.suspect == exp["parity_error_flag"]
            assert r.meal == u2.MEAL_CODES[exp["meal"]] and r.comment == u2.COMMENT_CODES[exp["comment_code"]]
        elif "serial_number" in exp:
            assert u2.decode_serial(text) == exp["serial_number"]
        elif "software_version" in exp:
            assert u2.decode_version(text) == exp["software_version"]


def test_glucometerutils_checksum_and_malformed_vectors(vectors: Any) -> None:
    doc = vectors.json("onetouch-ultra2", "glucometerutils-tests.json")
    for v in doc["checksum_vectors"]:
        assert u2.checksum(v["input_ascii"].encode()) == v["checksum_int"]
    expected_errors = {
        "494e56414c4944": MissingChecksum,
        "2e0d": MissingChecksum,
        "2520323530300d": InvalidChecksum,
        "2520313333370d": InvalidChecksum,
        "25203133415a0d": MissingChecksum,
    }
    for v in doc["invalid_replies_to_DM@"]:
        wire = bytes.fromhex(v["wire_hex"])
        if wire.hex() in expected_errors:
            with pytest.raises(expected_errors[wire.hex()]):
                u2.decode_serial(u2.strip_checksum(wire))
        else:
            # "12345678O": glucometerutils rejects (no trailing Y); the reference (A.4) says accept 8-9 chars.
            assert u2.decode_serial(u2.strip_checksum(wire)) == "12345678O"
    with pytest.raises(InvalidChecksum) as info:
        u2.strip_checksum(b"% 2500\r")
    assert (info.value.wire, info.value.calculated) == (0x2500, 0x0025)


def test_dmp_500_dump_matches_expected(vectors: Any) -> None:
    data = vectors.path("onetouch-ultra2", "insulaudit-dmp-500.txt").read_bytes()
    expected = vectors.json("onetouch-ultra2", "insulaudit-dmp-500.expected.json")
    decoded = u2.decode_capture(data)
    assert decoded.rejected == () and decoded.serial == "HAXGR4PV"
    assert len(decoded.readings) == expected["record_count"] == 500
    for r, e in zip(decoded.readings, expected["records"], strict=True):
        assert r.meter_time.isoformat() == e["timestamp_local"] and r.value_mgdl == e["value_mgdl"]
        assert r.meal == u2.MEAL_CODES[e["meal"]] and r.comment == u2.COMMENT_CODES[e["comment_code"]]
        assert r.control_solution == e["control_solution"] and (r.range_flag is RangeFlag.HIGH) == e["high"]
    assert sum(r.value_mgdl for r in decoded.readings) == expected["sum_mgdl"]
    assert len({r.record_key for r in decoded.readings}) == 500


def test_flipping_a_record_byte_rejects_that_line_only(vectors: Any) -> None:
    data = bytearray(vectors.path("onetouch-ultra2", "insulaudit-dmp-500.txt").read_bytes())
    lines = bytes(data).split(b"\n")
    at = len(lines[0]) + 1 + len(lines[1]) + 1 + 20  # inside record 2
    data[at] ^= 0x01
    decoded = u2.decode_capture(bytes(data))
    assert len(decoded.readings) == 499 and len(decoded.rejected) == 1 and "line 3" in decoded.rejected[0]


def test_session_vectors_and_other_captures(vectors: Any) -> None:
    session = vectors.json("onetouch-ultra2", "insulaudit-session.json")
    replies = b"".join(bytes.fromhex(s["hex"]) for s in session["exchange"] if s["dir"] == "meter->host" and "hex" in s)
    assert u2.decode_capture(replies).serial == "HAXGR4PV"
    other = vectors.json("onetouch-ultra2", "other-captures-unattributed.json")
    for section, count in (("legacy_onetouch_ultra_format", 11), ("ultra2_format", 7)):
        data = b"".join(u2.encode_line(line[: line.rindex(" ")].encode()) for line in other[section]["lines"])
        assert data == b"".join(line.encode() + b"\r\n" for line in other[section]["lines"])  # checksums as captured
        decoded = u2.decode_capture(data)
        assert decoded.rejected == () and len(decoded.readings) == count


# --- driver over a real pty ------------------------------------------------------------------------
