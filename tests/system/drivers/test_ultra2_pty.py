"""OneTouch Ultra 2: codec with literal bytes, every vector, and the driver over a real pty."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from drivers import onetouch_ultra2 as u2
from drivers.errors import MeterNotReady, NoResponse
from drivers.reader import read_meter
from drivers.simulators.faults import Faults
from drivers.simulators.records import random_records


# --- pure codec, literal bytes ------------------------------------------------------------------
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
