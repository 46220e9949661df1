"""Contour ASTM: frames and records with literal bytes, every vector, link behaviour over real ptys."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from drivers import contour_astm as ca
from drivers.models import Meal, RangeFlag
from drivers.reader import read_meter
from drivers.simulators.faults import Faults
from drivers.simulators.records import random_records

# --- pure codec, literal bytes ---------------------------------------------------------------------


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
    from drivers.errors import NoResponse

    with sim(ca.PROTOCOL, [], Faults(switched_on=True)) as (link, _), pytest.raises(NoResponse):
        read_meter(link, ca.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.2)


def test_driver_never_writes(sim: Any) -> None:
    with sim(ca.PROTOCOL, random_records(ca.PROTOCOL, 5, seed=2)) as (link, simulator):
        assert read_meter(link, None, wall_clock=dt.datetime.now).complete
    assert all(not c.startswith(b"W|") for c in simulator.commands_seen)


# --- records across frames, delimiters the header declares, frames before the ENQ (issue 15) ---------------
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
