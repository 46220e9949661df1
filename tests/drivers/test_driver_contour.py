"""Contour ASTM: frames and records with literal bytes, every vector, link behaviour over real ptys."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest

from agent.errors import InvalidChecksum, InvalidResponse, MissingChecksum
from agent.models import Meal, RangeFlag, Unit, mmoll_to_mgdl
from drivers import contour_astm as ca
from drivers.reader import read_meter
from drivers.simulators.faults import Faults
from drivers.simulators.records import random_records

H7150 = b"\x021H|\\^&||-7880|Bayer7150^1.05\\0.00^7150-SAM2193|||||||P|1|200305121635\r\x17AE\r\n"


# --- pure codec, literal bytes ---------------------------------------------------------------------
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


def test_glucodump_sync_session_over_pty(vectors: Any, scripted: Any, run_in_thread: Any) -> None:
    """Host writes exactly EOT, ACK, ACK; a transfer that ends (EOT) without L is incomplete."""
    doc = vectors.json("contour-astm", "sessions.json")["glucodump_test_sync_7150"]
    meter_reads = [bytes.fromhex(h) for h in doc["meter_reads_in_order_hex"]]
    host_writes = [bytes.fromhex(h) for h in doc["host_writes_in_order_hex"]]
    result = run_in_thread(read_meter, scripted.url, "contour-astm", wall_clock=dt.datetime.now, timeout=2)
    for meter, host in zip(meter_reads, host_writes, strict=True):
        scripted.expect(host)
        scripted.send(meter)
    read = result.result(timeout=10)
    assert read.identity.serial == "7150-SAM2193" and read.identity.model == "Contour"
    assert not read.complete and "ProtocolError" in (read.error or "") and read.readings == ()
    assert ca.decode_capture(b"".join(meter_reads)).serial == "7150-SAM2193"


def test_nak_then_retransmission_accepted_and_repeat_dropped(scripted: Any, run_in_thread: Any) -> None:
    header = ca.encode_frame(1, "H|\\^&||pw|Bayer7410^1.0^7410-9^x|V=10600|2|||||P|1|20240102030405", final=False)
    r1 = ca.encode_frame(2, "R|1|^^^Glucose|104|mg/dL^P||B||202401020300", final=False)
    r2 = ca.encode_frame(3, "R|2|^^^Glucose|5.5|mmol/L^P||>||202401011200", final=False)
    end = ca.encode_frame(4, "L|1||N", final=True)
    bad_r1 = r1[:-4] + b"00\r\n"
    result = run_in_thread(read_meter, scripted.url, "contour-astm", wall_clock=dt.datetime.now, timeout=2)
    scripted.expect(ca.EOT)
    scripted.send(ca.EOT + ca.ENQ)
    for wire, answer in ((header, ca.ACK), (bad_r1, ca.NAK), (r1, ca.ACK), (r1, ca.ACK), (r2, ca.ACK), (end, ca.ACK)):
        scripted.expect(answer if wire is header else b"")
        scripted.send(wire)
        scripted.expect(answer)
    scripted.send(ca.EOT)
    read = result.result(timeout=10)
    assert read.complete, read.error
    assert [(r.value_mgdl, r.range_flag, r.meal) for r in read.readings] == [
        (104, RangeFlag.IN_RANGE, Meal.BEFORE),
        (600, RangeFlag.HIGH, Meal.NONE),
    ]
    assert (
        read.identity.serial == "7410-9"
        and -5
        < (read.readings[0].clock_offset_s or 0)
        + (dt.datetime.now() - dt.datetime(2024, 1, 2, 3, 4, 5)).total_seconds()
        < 5
    )


def test_frame_out_of_sequence_is_a_protocol_error(scripted: Any, run_in_thread: Any) -> None:
    header = ca.encode_frame(1, "H|\\^&||pw|Bayer7410^1.0^7410-9^x||1|||||P|1|20240102030405", final=False)
    result = run_in_thread(read_meter, scripted.url, "contour-astm", wall_clock=dt.datetime.now, timeout=2)
    scripted.expect(ca.EOT)
    scripted.send(ca.ENQ)
    scripted.expect(ca.ACK)
    scripted.send(header)
    scripted.expect(ca.ACK)
    scripted.send(ca.encode_frame(3, "R|1|^^^Glucose|104|mg/dL^P||||202401020300", final=False))
    read = result.result(timeout=10)
    assert not read.complete and "out of sequence" in (read.error or "")


# --- simulator over a real pty ----------------------------------------------------------------------------
def test_roundtrip_with_frame_wrap_repeats_and_naks(sim: Any) -> None:
    records = random_records(ca.PROTOCOL, 30, seed=11)  # 33 frames: numbers wrap 7 -> 0 four times
    faults = Faults(repeat=0.2, bad_checksum=0.1, noise=0.05, seed=4)
    with sim(ca.PROTOCOL, records, faults) as (link, _):
        read = read_meter(link, ca.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.3)
    assert read.complete, read.error
    assert [r.with_offset(None) for r in read.readings] == records


def test_retry_limit_gives_up(sim: Any) -> None:
    records = random_records(ca.PROTOCOL, 3, seed=1)
    with sim(ca.PROTOCOL, records, Faults(bad_checksum=1.0)) as (link, _), pytest.raises(ca.ProtocolError):
        read_meter(link, ca.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.3)


def test_meter_not_in_transfer_mode_is_no_response(sim: Any) -> None:
    from agent.errors import NoResponse

    with sim(ca.PROTOCOL, [], Faults(switched_on=True)) as (link, _), pytest.raises(NoResponse):
        read_meter(link, ca.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.2)


def test_driver_never_writes(sim: Any) -> None:
    with sim(ca.PROTOCOL, random_records(ca.PROTOCOL, 5, seed=2)) as (link, simulator):
        assert read_meter(link, None, wall_clock=dt.datetime.now).complete
    assert all(not c.startswith(b"W|") for c in simulator.commands_seen)


# --- records across frames, delimiters the header declares, frames before the ENQ (issue 15) ---------------
OLD_HEADER = "H|\\^&||-7880|Bayer7150^1.05\\0.00^7150-SAM2193|||||||P|1|200305121635"


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


def test_header_frame_before_the_enq_is_skipped_over_pty(vectors: Any, scripted: Any, run_in_thread: Any) -> None:
    """glucometerutils' Contour USB capture: EOT, a whole 194-byte header frame, ENQ. The ENQ was looked for
    only 64 bytes ahead, so the meter was given up as "no response"."""
    lead = next(
        bytes.fromhex(f["wire_hex"])
        for f in vectors.json("contour-astm", "frames.json")["frames"]
        if f["expected"].get("bytes_after_CRLF_hex") == "05"
    )
    assert len(lead[1:-1]) == 194 and lead[:2] == ca.EOT + ca.STX and lead[-1:] == ca.ENQ  # EOT, frame, ENQ
    header_text = ca.decode_frame(lead[1:-1]).text
    result = run_in_thread(read_meter, scripted.url, "contour-astm", wall_clock=dt.datetime.now, timeout=2)
    scripted.expect(ca.EOT)
    scripted.send(lead)
    scripted.expect(ca.ACK)
    for number, text in enumerate([header_text, "P|1", "R|1|^^^Glucose|133|mg/dL^P||B/X||201202052034"], start=1):
        scripted.send(ca.encode_frame(number, text, final=False))
        scripted.expect(ca.ACK)
    scripted.send(ca.encode_frame(4, "L|1||N", final=True))
    scripted.expect(ca.ACK)
    scripted.send(ca.EOT)
    read = result.result(timeout=10)
    assert read.complete, read.error
    assert read.identity.serial == "7390-2336773" and [r.value_mgdl for r in read.readings] == [133]


def test_split_records_over_pty_literal(scripted: Any, run_in_thread: Any) -> None:
    """Every record of the transfer in 9-character intermediate frames, ACKed frame by frame."""
    records = [
        "H|\\^&||pw|Bayer7410^1.0^7410-9^x|V=10600|1|||||P|1|20240102030405",
        "P|1",
        "R|1|^^^Glucose|104|mg/dL^P||B||202401020300",
        "L|1||N",
    ]
    frames = re.findall(rb"\x02[^\x02]*?\r\n", _split_wire(records, 9))
    assert len(frames) > 12 and all(f[-5:-4] == ca.ETB for f in frames[:-1]) and frames[-1][-5:-4] == ca.ETX
    result = run_in_thread(read_meter, scripted.url, "contour-astm", wall_clock=dt.datetime.now, timeout=2)
    scripted.expect(ca.EOT)
    scripted.send(ca.ENQ)
    scripted.expect(ca.ACK)
    for frame in frames:
        scripted.send(frame)
        scripted.expect(ca.ACK)
    scripted.send(ca.EOT)
    read = result.result(timeout=10)
    assert read.complete, read.error
    assert [(r.value_mgdl, r.meal) for r in read.readings] == [(104, Meal.BEFORE)]


def test_eot_inside_a_split_record_is_a_protocol_error(scripted: Any, run_in_thread: Any) -> None:
    header = "H|\\^&||pw|Bayer7410^1.0^7410-9^x|V=10600|1|||||P|1|20240102030405"
    result = run_in_thread(read_meter, scripted.url, "contour-astm", wall_clock=dt.datetime.now, timeout=2)
    scripted.expect(ca.EOT)
    scripted.send(ca.ENQ)
    scripted.expect(ca.ACK)
    scripted.send(ca.encode_frame(1, header, final=False))
    scripted.expect(ca.ACK)
    scripted.send(ca.encode_frame(2, "R|1|^^^Glucose|1", final=False, ends_record=False))
    scripted.expect(ca.ACK)
    scripted.send(ca.EOT)
    read = result.result(timeout=10)
    assert not read.complete and read.readings == () and "inside a record" in (read.error or "")


@pytest.mark.parametrize("faults", [Faults(), Faults(repeat=0.2, bad_checksum=0.1, noise=0.05, seed=8)])
def test_roundtrip_with_split_frames_and_a_leading_header(sim: Any, faults: Faults) -> None:
    records = random_records(ca.PROTOCOL, 25, seed=21)
    with sim(ca.PROTOCOL, records, faults) as (link, simulator):
        simulator.frame_text_max = 17  # every record spans 2-11 frames; frame numbers wrap many times
        simulator.lead_header = True
        read = read_meter(link, None, wall_clock=dt.datetime.now, timeout=0.3)  # the probe skips the frame too
    assert read.complete, read.error
    assert read.identity.protocol == ca.PROTOCOL
    assert [r.with_offset(None) for r in read.readings] == records


def test_unplugged_inside_a_split_record_keeps_what_verified(sim: Any) -> None:
    records = random_records(ca.PROTOCOL, 12, seed=22)
    with sim(ca.PROTOCOL, records, Faults(unplug_after=5)) as (link, simulator):
        simulator.frame_text_max = 11
        read = read_meter(link, ca.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.3)
    assert not read.complete and read.error
    assert [r.with_offset(None) for r in read.readings] == records[:5]
