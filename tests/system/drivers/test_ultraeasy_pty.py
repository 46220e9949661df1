"""OneTouch UltraEasy: CRC and packets with literal bytes, every vector, link retries over real ptys."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import pytest

from drivers import onetouch_ultraeasy as ue
from drivers.errors import NoResponse
from drivers.reader import read_meter
from drivers.simulators.faults import Faults
from drivers.simulators.records import random_records


def test_lost_reply_is_requested_again_with_the_same_send_bit(scripted: Any, run_in_thread: Any) -> None:
    dev_future = run_in_thread(lambda: ue.Device(scripted.url, timeout=0.3))
    dev = dev_future.result(timeout=5)
    try:
        clock = run_in_thread(dev.read_clock)
        scripted.expect(ue.encode_packet(b"", ue.link_bits(disc=True)))
        scripted.send(ue.encode_packet(b"", ue.link_bits(disc=True, ack=True)))
        request = ue.encode_packet(ue.REQ_CLOCK, ue.link_bits(s=0, e=0))
        scripted.expect(request)
        scripted.send(ue.encode_packet(b"", ue.link_bits(ack=True, e=1)))  # reply then "lost"
        scripted.expect(request)  # same S bit again after the timeout
        scripted.send(ue.encode_packet(b"", ue.link_bits(ack=True, e=1)))
        when = dt.datetime(2021, 5, 6, 7, 8, 9)
        scripted.send(ue.encode_packet(b"\x05\x06" + struct.pack("<I", ue.encode_time(when)), ue.link_bits(s=0, e=1)))
        scripted.expect(ue.encode_packet(b"", ue.link_bits(s=1, e=1, ack=True)))
        assert clock.result(timeout=5) == when
    finally:
        dev.close()


def test_roundtrip_with_noise_drops_and_bad_crc(sim: Any) -> None:
    records = random_records(ue.PROTOCOL, 25, seed=5)
    faults = Faults(noise=0.05, drop=0.05, bad_checksum=0.05, seed=8)
    with sim(ue.PROTOCOL, records, faults) as (link, simulator):
        read = read_meter(link, ue.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.2)
    assert read.complete, read.error
    assert [r.with_offset(None) for r in read.readings] == records
    sent = [c[:3] for c in simulator.commands_seen]
    assert b"\x05\x1a" not in [c[:2] for c in sent] and b"\x05\x20\x01" not in sent


def test_switched_on_gives_no_response(sim: Any) -> None:
    with sim(ue.PROTOCOL, [], Faults(switched_on=True)) as (link, _), pytest.raises(NoResponse):
        read_meter(link, ue.PROTOCOL, wall_clock=dt.datetime.now, timeout=0.2)
