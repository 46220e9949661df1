"""Contour ASTM: frames and records with literal bytes, every vector, link behaviour over real ptys."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest

from drivers import contour_astm as ca
from drivers.errors import InvalidChecksum, InvalidResponse, MissingChecksum
from drivers.models import Meal, RangeFlag, Unit, mmoll_to_mgdl

# --- pure codec, literal bytes ---------------------------------------------------------------------
OLD_HEADER = "H|\\^&||-7880|Bayer7150^1.05\\0.00^7150-SAM2193|||||||P|1|200305121635"


def _split_wire(records: list[str], size: int) -> bytes:
    """A transfer's frames with every record split into ``size``-character pieces (literal E1381)."""
    wire, number = b"", ca.FIRST_FRAME
    for i, text in enumerate(records):
        pieces = ca.split_record(text, size)
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1
            wire += ca.encode_frame(number, piece, final=last and i == len(records) - 1, ends_record=last)
            number += 1
    return wire


def test_frame_literal_python_astm_style() -> None:
    assert ca.decode_frame(b"\x025L|1||N\r\x0384\r\n") == ca.Frame(5, "L|1||N", final=True)
    assert ca.encode_frame(5, "L|1||N", final=True) == b"\x025L|1||N\r\x0384\r\n"
    assert ca.encode_frame(8, "H", final=False) == b"\x020H\r\x179C\r\n"  # 8 wraps to 0


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"\x025L|1||N\r\x0385\r\n", InvalidChecksum),
        (b"\x025L|1||N\r\x0384\r", MissingChecksum),
        (b"\x025L|1||N\x0384\r\n", MissingChecksum),
        (b"\x025L|1||N\r\x038z\r\n", MissingChecksum),
        (b"\x029L|1||N\r\x0388\r\n", InvalidResponse),
        (b"\x025L|1|\x00|N\r\x0384\r\n", InvalidResponse),  # a NUL leaves a sum unchanged: caught as text
    ],
)
def test_bad_frames_rejected(wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        ca.decode_frame(wire)


def test_checksum_error_shows_both_values() -> None:
    with pytest.raises(InvalidChecksum) as info:
        ca.decode_frame(b"\x025L|1||N\r\x0385\r\n")
    assert (info.value.wire, info.value.calculated) == (0x85, 0x84)


def test_high_low_markers_use_header_limits() -> None:
    when = dt.datetime(2020, 1, 2, 3, 4)
    hi = ca.make_reading("S", when, "600", "mg/dL", (">",), (20, 600))
    lo = ca.make_reading("S", when, "1.1", "mmol/L", ("<", "B"), (20, 600))
    assert (hi.range_flag, hi.value_mgdl, lo.range_flag, lo.value_mgdl) == (RangeFlag.HIGH, 600, RangeFlag.LOW, 20)
    assert lo.meal is Meal.BEFORE and lo.native_unit is Unit.MMOLL and lo.comment == "</B"
    header = ca.decode_header("H|\\^&||x|Bayer7410^1^7410-1^0|V=20500|1|||||P|1|20200102030405")
    assert header.limits == (20, 500) and header.clock == dt.datetime(2020, 1, 2, 3, 4, 5)


def test_control_markers_both_layouts() -> None:
    new = ca.decode_result("R|1|^^^Glucose|120|mg/dL^P||C/M0||202001020304")
    old = ca.decode_result("R|2|^^^Glucose|6.5|mmol/L^P||||E|||200612190719")
    assert new.control and old.control and old.markers == ("E",)


# --- vectors --------------------------------------------------------------------------------------------
def test_every_frame_vector(vectors: Any) -> None:
    for v in vectors.json("contour-astm", "frames.json")["frames"]:
        exp = v["expected"]
        wire = bytes.fromhex(v["wire_hex"])
        before, after = bytes.fromhex(exp["bytes_before_STX_hex"]), bytes.fromhex(exp["bytes_after_CRLF_hex"])
        frame = ca.decode_frame(wire[len(before) : len(wire) - len(after)])
        assert frame.number == exp["frame_number"] and frame.text == exp["record_text"]
        assert frame.final == (exp["terminator"] == "ETX")
        assert ca.encode_frame(frame.number, frame.text, final=frame.final)[-4:-2].decode() == exp["checksum_hex"]
        if "header" in exp:
            h, eh = ca.decode_header(frame.text), exp["header"]
            assert (h.product, list(h.versions), h.serial) == (eh["product_code"], eh["versions"], eh["serial"])
            assert dict(h.config) == eh["config"] and h.password == eh["password"]
            assert h.record_count == (int(eh["record_count"]) if eh["record_count"] else None)
            assert h.clock == ca.parse_time(eh["datetime"])
        if "result" in exp:
            r, er = ca.decode_result(frame.text), exp["result"]
            assert (r.sequence, r.analyte, r.value, r.unit, r.method) == (
                er["sequence"],
                er["analyte"],
                er["value"],
                er["unit"],
                er["reference_method"],
            )
            assert list(r.markers) == er["markers"] and r.when == ca.parse_time(er["timestamp"])
            reading = ca.result_reading(r, h)
            assert reading.value_mgdl == int(er["value"]) and reading.meal is ca.MEAL_MARKS.get(
                er["markers"][0], Meal.NONE
            )


def test_header_vectors_units_and_limits(vectors: Any) -> None:
    frames = vectors.json("contour-astm", "frames.json")["frames"]
    headers = [ca.decode_header(f["expected"]["record_text"]) for f in frames if "header" in f["expected"]]
    by_serial = {h.serial: h for h in headers}
    assert by_serial["7390-2336773"].setting("U") == "0" and by_serial["7390-2336773"].limits == (10, 600)
    assert by_serial["7390-1163170"].setting("U") == "1"
    assert by_serial["7428-4293200"].limits == (20, 600) and by_serial["7428-4293200"].model == "Contour Next USB"
    assert by_serial["7150-SAM2193"].limits == ca.DEFAULT_LIMITS and by_serial["7150-SAM2193"].model == "Contour"


def test_record_vectors_both_layouts(vectors: Any) -> None:
    doc = vectors.json("contour-astm", "records.json")
    gu = doc["glucometerutils_result_record"]
    r = ca.decode_result(gu["record"])
    e = gu["expected"]
    assert (str(r.sequence), r.analyte, r.value, r.unit, r.method, "/".join(r.markers)) == (
        e["seq_num"],
        e["test_id"],
        e["value"],
        e["unit"],
        e["ref_method"],
        e["markers"],
    )
    assert r.when == ca.parse_time(e["datetime"])
    old = doc["ggc_old_contour_result"]
    frame_text = old["record_reconstructed"]
    assert int(frame_text[0]) == old["expected"]["frame_number"]
    r = ca.decode_result(frame_text[1:])
    assert (r.sequence, r.value, r.unit, r.markers) == (2, "2.83", "mmol/L", ())
    reading = ca.make_reading("S", r.when, r.value, r.unit, r.markers, ca.DEFAULT_LIMITS)
    assert reading.value_mgdl == mmoll_to_mgdl(Decimal("2.83")) == 51 and reading.native_value == "2.83"
    assert ca.parse_time(doc["glucometerutils_get_datetime"]["header_datetime_field"]) == dt.datetime(
        2019, 8, 7, 13, 15
    )


def test_command_mode_vectors(vectors: Any) -> None:
    doc = vectors.json("contour-astm", "sessions.json")
    replies = [bytes.fromhex(h) for h in doc["healer_clock_read"]["meter_replies_hex"]]
    assert (
        ca.decode_clock_replies(replies[1], replies[3]).isoformat() == doc["healer_clock_read"]["expected"]["datetime"]
    )
    assert ca.decode_command_reply(bytes.fromhex(doc["glucodump_test_command"]["steps"][2]["meter_hex"])) == "0"
    with pytest.raises(InvalidResponse):
        ca.decode_command_reply(b"\x04")


def test_intermediate_frame_literal() -> None:
    """E1381: an intermediate frame has its text then ETB, no CR (the record goes on in the next frame)."""
    assert ca.encode_frame(2, "ab", final=False, ends_record=False) == b"\x022ab\x170C\r\n"
    assert ca.decode_frame(b"\x022ab\x170C\r\n") == ca.Frame(2, "ab", final=False, ends_record=False)
    assert ca.decode_frame(b"\x022ab\r\x1719\r\n") == ca.Frame(2, "ab", final=False, ends_record=True)
    with pytest.raises(MissingChecksum):
        ca.decode_frame(b"\x022ab\x03F8\r\n")  # a final (ETX) frame must end its record


def test_joiner_splits_records_at_cr_across_frames() -> None:
    joiner = ca.RecordJoiner()
    pieces = [
        ca.Frame(1, "R|1|^^^Glu", final=False, ends_record=False),
        ca.Frame(2, "cose|104|mg/d", final=False, ends_record=False),
        ca.Frame(3, "L||B||202401020300", final=False),
    ]
    assert joiner.feed(pieces[0]) == [] and joiner.partial
    assert joiner.feed(pieces[1]) == []
    assert joiner.feed(pieces[2]) == ["R|1|^^^Glucose|104|mg/dL||B||202401020300"] and not joiner.partial
    # python-astm style: several records in one frame, CR between them
    assert joiner.feed(ca.Frame(4, "P|1\rL|1||N", final=True)) == ["P|1", "L|1||N"]
    with pytest.raises(ca.ProtocolError, match="longer than"):
        for n in range(ca.MAX_RECORD // 200 + 2):
            joiner.feed(ca.Frame(n % 8, "x" * 200, final=False, ends_record=False))


def test_capture_with_records_split_at_any_byte() -> None:
    records = [OLD_HEADER, "P|1", "R|1|^^^Glucose|5.5|mmol/L^P|||||||200612190719", "L|1||N"]
    for size in (1, 7, 13, 40, 240):
        decoded = ca.decode_capture(ca.EOT + ca.ENQ + _split_wire(records, size) + ca.EOT)
        assert decoded.rejected == () and decoded.serial == "7150-SAM2193", size
        assert [(r.native_value, r.value_mgdl) for r in decoded.readings] == [("5.5", mmoll_to_mgdl(Decimal("5.5")))]


def test_capture_drops_a_record_whose_piece_was_bad() -> None:
    records = [
        OLD_HEADER,
        "R|1|^^^Glucose|99|mg/dL^P|||||||200612190719",
        "R|2|^^^Glucose|120|mg/dL^P|||||||200612190720",
    ]
    frames = [m.group(0) for m in re.finditer(rb"\x02[^\x02]*?\r\n", _split_wire([*records, "L|1||N"], 20))]
    bad = frames[4][:-4] + b"00\r\n"  # a piece in the middle of the first result
    decoded = ca.decode_capture(b"".join([*frames[:4], bad, *frames[5:]]))
    assert [r.value_mgdl for r in decoded.readings] == [120] and decoded.rejected


def test_old_layout_repeated_abnormal_flags_with_the_declared_repeat_delimiter() -> None:
    """``>\\T``: HIGH and T, repeated with E1394's repeat delimiter; split only on '/', HIGH read as in range."""
    text = "R|3|^^^Glucose|600|mg/dL^P||>\\T|||||200612190719"
    result = ca.decode_result(text)
    assert result.markers == (">", "T")
    reading = ca.make_reading("S", result.when, result.value, result.unit, result.markers, ca.DEFAULT_LIMITS)
    assert (reading.range_flag, reading.value_mgdl) == (RangeFlag.HIGH, 600)
    low = ca.decode_result("R|4|^^^Glucose|10|mg/dL^P||<\\T||E\\X|||200612190720")
    assert low.markers == ("<", "T", "E", "X") and low.control


def test_delimiters_come_from_the_header() -> None:
    header_text = "H!~%$!!pw!Bayer7150%1.05~0.00%7150-DEL1!!!!!!!P!1!200305121635"
    header = ca.decode_header(header_text)
    assert header.delimiters == ca.Delimiters("!", "~", "%", "$")
    assert (header.serial, header.versions, header.model) == ("7150-DEL1", ("1.05", "0.00"), "Contour")
    result_text = "R!1!%%%Glucose!600!mg/dL%P!!>~T!!!!!200612190719"
    assert ca.decode_result(result_text, header.delimiters).markers == (">", "T")
    decoded = ca.decode_capture(_split_wire([header_text, result_text, "L!1!!N"], 240))
    assert [(r.range_flag, r.value_mgdl) for r in decoded.readings] == [(RangeFlag.HIGH, 600)]
    for bad in ("H|||^&", "H|\\^A|", "H|"):
        with pytest.raises(InvalidResponse):
            ca.decode_header(bad + "|x|B^1^S|||||||P|1|200305121635")
