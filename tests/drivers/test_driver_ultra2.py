"""OneTouch Ultra 2: codec with literal bytes, every vector, and the driver over a real pty."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from agent.errors import InvalidChecksum, MeterNotReady, MissingChecksum, NoResponse
from agent.models import Meal, RangeFlag
from drivers import onetouch_ultra2 as u2
from drivers.reader import read_meter
from drivers.simulators.faults import Faults
from drivers.simulators.records import random_records

NOW = dt.datetime(2026, 3, 1, 12, 0, 0)


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
def test_read_meter_over_pty_roundtrip_and_clock_offset(sim: Any) -> None:
    records = random_records(u2.PROTOCOL, 40, seed=7)
    with sim(u2.PROTOCOL, records, clock_skew_s=-3600) as (link, _sim):
        result = read_meter(link, None, wall_clock=dt.datetime.now)
    assert result.complete and result.error is None
    assert result.identity.serial == "HAXGR4PV" and result.identity.protocol == u2.PROTOCOL
    assert [r.with_offset(None) for r in result.readings] == records
    offsets = {r.clock_offset_s for r in result.readings}
    assert len(offsets) == 1 and -3602 < offsets.pop() <= -3599  # type: ignore[operator]


def test_switched_on_meter_is_reported_not_ready(sim: Any) -> None:
    with sim(u2.PROTOCOL, random_records(u2.PROTOCOL, 3, seed=1), Faults(switched_on=True)) as (link, _):
        with pytest.raises(MeterNotReady):
            read_meter(link, u2.PROTOCOL, wall_clock=dt.datetime.now)
        # probing still recognises the meter (it answers 00)
        with pytest.raises(MeterNotReady):
            read_meter(link, None, wall_clock=dt.datetime.now)


def test_unplug_mid_dump_keeps_verified_records(sim: Any) -> None:
    records = random_records(u2.PROTOCOL, 20, seed=3)
    with sim(u2.PROTOCOL, records, Faults(unplug_after=7)) as (link, sim):
        result = read_meter(link, u2.PROTOCOL, wall_clock=dt.datetime.now)
    assert not result.complete and result.error
    assert [r.with_offset(None) for r in result.readings] == records[:7]
    assert all(c in u2.READ_ONLY_COMMANDS for c in sim.commands_seen)


def test_bad_checksum_lines_never_become_readings(sim: Any) -> None:
    records = random_records(u2.PROTOCOL, 60, seed=5)
    with sim(u2.PROTOCOL, records, Faults(bad_checksum=0.2, seed=9)) as (link, _):
        result = read_meter(link, u2.PROTOCOL, wall_clock=dt.datetime.now)
    got = [r.with_offset(None) for r in result.readings]
    assert not result.complete and "checksum" in (result.error or "")
    assert len(got) < 60 and all(r in records for r in got)


def test_silent_port_gives_no_response(sim: Any) -> None:
    with sim(u2.PROTOCOL, []) as (link, sim):
        sim.faults = Faults()
        from drivers.onetouch_ultra2 import Device

        with Device(link, timeout=0.2) as dev, pytest.raises(NoResponse):
            dev._command(b"XYZ")  # unknown command: the meter stays silent
