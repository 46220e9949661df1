"""The captured pen session decodes to the 96 doses and identity of nvp_datatest.expected.json."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from drivers.cli import main
from drivers.novopen import decode_capture, type4
from drivers.novopen.session import CaptureReplay, SessionState, parse_capture, run_session


def test_capture_parses_into_reply_apdus(capture_bytes: bytes) -> None:
    replies = parse_capture(capture_bytes)
    assert len(replies) == 64
    assert all(r.endswith(b"\x90\x00") for r in replies)
    assert replies[2] == bytes.fromhex("000F20010C010C0406E104010C00009000")
    # PHD records over 255 bytes arrive as a 255-byte and a 4-byte READ BINARY reply
    assert [len(r) - 2 for r in replies if len(r) - 2 in (255, 4)].count(255) == 5


def test_capture_decodes_to_expected_doses_and_identity(capture_bytes: bytes, expected: dict[str, Any]) -> None:
    records = decode_capture(capture_bytes)
    pen, entries = records[0], records[1:]
    device = expected["device"]
    assert pen["kind"] == "pen"
    assert (pen["serial"], pen["model"], pen["firmware"]) == (
        device["serial"],
        device["model_joined"],
        device["sw_revision"],
    )
    assert pen["part_number"] == device["part_number"]
    assert pen["system_id"] == device["system_id_eui64"]
    assert pen["pen_clock_s"] == device["relative_time_at_read_s"]
    assert (pen["store_capacity"], pen["store_usage"]) == (device["store_capacity"], device["store_usage"])
    assert (pen["reports"], pen["complete"], pen["error"]) == (len(expected["segment_reports"]), True, None)
    want = expected["doses_in_pen_order_newest_first"]
    assert len(entries) == len(want) == expected["checked_by_upstream_test"]["asserts"]["dose_count"] == 96
    for got, exp in zip(entries, want, strict=True):
        assert got["kind"] == ("dose" if exp["valid_per_xdrip_and_nvp"] else "rejected")
        assert got["relative_time_s"] == exp["relative_time_s"]
        assert got["units_raw_hex"] == exp["units_raw_hex"]
        assert Decimal(got["units"]) == Decimal(str(exp["units"]))
        assert got["flags_hex"] == exp["flags_hex"]
        assert got["seconds_before_report"] == exp["seconds_before_report"]
    asserts = expected["checked_by_upstream_test"]["asserts"]
    assert [Decimal(e["units"]) * 10 for e in entries[:6]] == asserts["first6_units_tenths"]
    assert [-e["seconds_before_report"] for e in entries[:6]] == asserts["first6_seconds_relative_to_read"]
    assert len({e["record_key"] for e in entries}) == 96
    json.dumps(records)  # JSON-ready


def test_capture_session_sends_the_reads_nvp_sent(capture_bytes: bytes) -> None:
    """Replies line up only if our commands match: spot-check reads, chunking and acks."""
    replay = CaptureReplay(parse_capture(capture_bytes))
    state = run_session(replay, SessionState())
    assert state.complete
    assert replay.commands[:6] == [
        type4.select_application(),
        type4.select_file(type4.CC_FILE_ID),
        type4.read_binary(0, 15),
        type4.select_file(type4.NDEF_FILE_ID),
        type4.read_binary(0, 2),
        type4.read_binary(2, 0x3D),
    ]
    assert replay.commands[6] == bytes.fromhex("00D60000050003D00000")
    assert type4.read_binary(2, 255) in replay.commands and type4.read_binary(257, 4) in replay.commands
    assert len(replay.commands) == 65  # every reply consumed, plus our release answer that found the pen gone


def test_truncated_capture_keeps_what_arrived(capture_bytes: bytes) -> None:
    replies = parse_capture(capture_bytes)
    cut = b"\n\n".join(
        b"\n".join(b"0x%08X %s" % (i, r[i : i + 16].hex(" ").upper().encode()) for i in range(0, len(r), 16))
        for r in replies[:40]
    )
    records = decode_capture(cut)
    assert records[0]["complete"] is False and "PenRemoved" in records[0]["error"]
    assert 0 < len(records) - 1 < 96


def test_garbled_capture_is_a_typed_error() -> None:
    with pytest.raises(Exception) as caught:
        decode_capture(b"0x00000000 90 00\n\n0x00000010 90 00\n")
    assert type(caught.value).__module__ == "drivers.errors"


def test_cli_decode_json(capture_bytes: bytes, novopen_vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decode", "--protocol", "novopen", "--json", str(novopen_vectors / "nvp_datatest.txt")]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records == decode_capture(capture_bytes)
