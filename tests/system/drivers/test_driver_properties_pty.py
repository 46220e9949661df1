"""Hypothesis properties: parsers never crash or invent readings; simulators round-trip over real ptys."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import contour_astm as ca
from drivers import onetouch_ultra2 as u2
from drivers import onetouch_ultraeasy as ue
from drivers.errors import DriverError
from drivers.models import GlucoseReading, MeterRead
from drivers.reader import read_meter
from drivers.simulators.faults import Faults
from drivers.simulators.pty_link import PtyLink
from drivers.simulators.records import random_records

PROTOCOLS = (u2.PROTOCOL, ca.PROTOCOL, ue.PROTOCOL)
PTY = settings(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.too_slow])


# --- pure parsers --------------------------------------------------------------------------------------
class Meter:
    """A simulator thread on its own pty; ``replug`` starts a fresh one on the same link path."""

    def __init__(self, protocol: str, records: list[GlucoseReading], faults: Faults, directory: str) -> None:
        from drivers.simulators.run import make_simulator

        self.protocol, self.records = protocol, records
        self.path = Path(directory) / "ttyMETER"
        self.stop = threading.Event()
        self.link = PtyLink(self.path)
        self.sim = make_simulator(protocol, self.link, records, faults, baud=None, stop_event=self.stop)
        self.thread = threading.Thread(target=self.sim.serve, kwargs={"poll_s": 0.01}, daemon=True)
        self.thread.start()

    def read(self) -> MeterRead:
        return read_meter(str(self.path), self.protocol, wall_clock=dt.datetime.now, timeout=0.15)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.link.close()
        assert not self.thread.is_alive()


def ledger_read(meter: Meter, ledger: dict[str, GlucoseReading], originals: list[GlucoseReading]) -> MeterRead | None:
    """One read as the agent does it: store only keys the ledger has not seen (None: failed before records)."""
    try:
        read = meter.read()
    except DriverError:
        return None
    keys = [r.record_key for r in read.readings]
    assert len(keys) == len(set(keys)), "a reading was doubled within one read"
    for r in read.readings:
        assert r.with_offset(None) in originals, "a reading that the meter does not hold"
        ledger.setdefault(r.record_key, r.with_offset(None))
    return read


faults_strategy = st.builds(
    Faults,
    noise=st.sampled_from([0.0, 0.03]),
    drop=st.sampled_from([0.0, 0.03]),
    bad_checksum=st.sampled_from([0.0, 0.05]),
    repeat=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 1000),
)


@PTY
@given(protocol=st.sampled_from(PROTOCOLS), seed=st.integers(0, 2**16), count=st.integers(0, 25))
def test_roundtrip_exact_without_faults(protocol: str, seed: int, count: int) -> None:
    records = random_records(protocol, count, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        meter = Meter(protocol, records, Faults(), tmp)
        try:
            read = meter.read()
        finally:
            meter.close()
    assert read.complete, read.error
    assert [r.with_offset(None) for r in read.readings] == records


@PTY
@given(
    protocol=st.sampled_from(PROTOCOLS), seed=st.integers(0, 2**16), count=st.integers(1, 20), faults=faults_strategy
)
def test_roundtrip_with_faults_loses_nothing_over_rereads(protocol: str, seed: int, count: int, faults: Faults) -> None:
    records = random_records(protocol, count, seed=seed)
    ledger: dict[str, GlucoseReading] = {}
    with tempfile.TemporaryDirectory() as tmp:
        meter = Meter(protocol, records, faults, tmp)
        try:
            for _ in range(12):
                read = ledger_read(meter, ledger, records)
                if read is not None and read.complete and len(ledger) == count:
                    break
        finally:
            meter.close()
    assert sorted(ledger.values(), key=records.index) == records


@PTY
@given(protocol=st.sampled_from(PROTOCOLS), seed=st.integers(0, 2**16), count=st.integers(1, 20), data=st.data())
def test_dump_cut_at_a_random_point_then_read_again_yields_the_full_set_once(
    protocol: str, seed: int, count: int, data: Any
) -> None:
    cut = data.draw(st.integers(0, count - 1), label="cut")
    records = random_records(protocol, count, seed=seed)
    ledger: dict[str, GlucoseReading] = {}
    with tempfile.TemporaryDirectory() as tmp:
        meter = Meter(protocol, records, Faults(unplug_after=cut), tmp)
        try:
            first = ledger_read(meter, ledger, records)
        finally:
            meter.close()
        assert (
            first is not None and not first.complete and [r.with_offset(None) for r in first.readings] == records[:cut]
        )
        meter = Meter(protocol, records, Faults(), tmp)  # plugged in again
        try:
            second = ledger_read(meter, ledger, records)
        finally:
            meter.close()
    assert second is not None and second.complete
    new = [r for r in second.readings if r.record_key not in {x.record_key for x in first.readings}]
    assert len(first.readings) + len(new) == count
    assert sorted(ledger.values(), key=records.index) == records


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reading_the_same_meter_twice_gives_the_same_keys(protocol: str) -> None:
    records = random_records(protocol, 15, seed=99)
    ledger: dict[str, GlucoseReading] = {}
    with tempfile.TemporaryDirectory() as tmp:
        meter = Meter(protocol, records, Faults(), tmp)
        try:
            first = ledger_read(meter, ledger, records)
            second = ledger_read(meter, ledger, records)
        finally:
            meter.close()
    assert first is not None and first.complete and second is not None and second.complete
    assert [r.record_key for r in first.readings] == [r.record_key for r in second.readings]
    assert len(ledger) == 15  # the second read added nothing


@PTY
@given(protocol=st.sampled_from(PROTOCOLS), garbage=st.binary(min_size=1, max_size=200))
def test_a_meter_answering_garbage_never_hangs_the_driver(protocol: str, garbage: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        link = PtyLink(Path(tmp) / "ttyJUNK")
        stop = threading.Event()

        def junk() -> None:
            os.set_blocking(link.master, False)
            while not stop.is_set():
                if link.read(timeout=0.01):
                    with contextlib.suppress(BlockingIOError):
                        os.write(link.master, garbage)

        thread = threading.Thread(target=junk, daemon=True)
        thread.start()
        started = time.monotonic()
        try:
            read = read_meter(str(link.link), protocol, wall_clock=dt.datetime.now, timeout=0.05)
            assert read.readings == () or all(isinstance(r, GlucoseReading) for r in read.readings)
        except DriverError:
            pass
        finally:
            stop.set()
            thread.join(5)
            link.close()
        assert time.monotonic() - started < 30
