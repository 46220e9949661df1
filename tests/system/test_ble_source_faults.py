"""The agent's BLE source against every simulator fault, on real ptys and a real SQLite buffer: each one is
survived with one clear log line (once per change, not once per round), what verified is stored, the rest
comes on the next read, and glucose alerts/flags work as for the serial meters."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.ble_source import GLUCOSE, BleSource, keystore_path, source_name
from agent.buffer.intake import Recorder
from agent.buffer.store import Store
from agent.clock import Clock
from agent.config import AlertsSection, BleRadio
from agent.identity.signer import Signer
from agent.wire import cose, telemetry
from drivers.ble.central import BleCentral
from drivers.simulators import ble_glucose
from drivers.simulators.ble_glucose import GlsFaults, GlsRecord, GlucoseMeter

GLS = ble_glucose.DEFAULT_ADDRESS
SOURCE = source_name(GLUCOSE, GLS)


class Box:
    def __init__(self, tmp: Path, meter: GlucoseMeter) -> None:
        self.link = tmp / "ttyBLE"
        self.thread, self.stop = ble_glucose.serve_in_thread(meter, str(self.link))
        self.store = Store(tmp / "buffer.db", max_records=100_000)
        self.key = ed25519.Ed25519PrivateKey.generate()
        signer = Signer("gd-000000000001", self.key, b"kid", Clock())
        self.stored = threading.Event()
        self.source = BleSource(BleRadio("radio", str(self.link), connect_s=3.0), tmp, Recorder(self.store, signer, AlertsSection()), self.stored.set)  # fmt: skip
        self.central = BleCentral(str(self.link), keystore_path(tmp), connect_timeout=3.0)
        meter.ready.wait(15)
        self.central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)

    def read(self) -> int:
        return self.source.read_device(self.central, GLS, GLUCOSE)

    def records(self) -> list[telemetry.Record]:
        rows = self.store._read("SELECT cose FROM outbox WHERE stream = 'c' ORDER BY seq")
        public = self.key.public_key()
        return [telemetry.decode(cose.verify1(raw, lambda kid: public if kid == b"kid" else None).payload) for (raw,) in rows]  # fmt: skip

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.store.close()


@pytest.fixture
def box(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Box]:
    records, faults = request.param
    b = Box(tmp_path, GlucoseMeter(records, faults))
    yield b
    b.close()


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.ble_source" and text in r.getMessage()]


@pytest.mark.parametrize("box", [(ble_glucose.demo_records(120), GlsFaults(disconnect_after=50))], indirect=True)
def test_a_dropped_link_keeps_what_verified_and_the_next_read_brings_the_rest(box: Box, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    first = box.read()
    assert 0 < first < 120 and _lines(caplog, "cut off")
    assert box.read() == 120 - first
    keys = [r.fields["glu:key"] for r in box.records()]
    assert len(keys) == len(set(keys)) == 120


@pytest.mark.parametrize("box", [(ble_glucose.demo_records(40), GlsFaults(duplicate_every=7, garbage=frozenset({5})))], indirect=True)  # fmt: skip
def test_duplicates_counted_once_garbage_rejected_with_a_line(box: Box, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    assert box.read() == 39
    assert any("5" in m for m in _lines(caplog, SOURCE) if "NaN" in m or "not" in m)
    assert box.read() == 0


@pytest.mark.parametrize("box", [(ble_glucose.demo_records(5), GlsFaults(racp_error=8))], indirect=True)
def test_a_meter_refusing_the_request_is_one_line_per_change_and_survived(box: Box, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert box.read() == 0
    assert len(_lines(caplog, "RecordAccessError")) == 1  # logged once, not once per round
    assert box.source.errors == 3
    box.source.radio = BleRadio("radio", str(box.link) + ".gone")
    gone = BleCentral(str(box.link) + ".gone", keystore_path(box.link.parent))
    assert box.source.read_device(gone, GLS, GLUCOSE) == 0
    assert len(_lines(caplog, "ControllerAbsent")) == 1


T0 = dt.datetime(2026, 3, 1, 8, 0)
FLAGGED = [
    GlsRecord(1, T0, 45),  # hypo, severe
    GlsRecord(2, T0 + dt.timedelta(hours=1), 600, status=1 << 5),  # result above the device's range: HIGH
    GlsRecord(3, T0 + dt.timedelta(hours=2), 40, control=True),  # control solution: no alert
    GlsRecord(4, T0 + dt.timedelta(hours=3), 110, meal=1),
]


@pytest.mark.parametrize("box", [(FLAGGED, GlsFaults())], indirect=True)
def test_gls_readings_are_the_same_signed_records_with_alerts_and_flags(box: Box) -> None:
    assert box.read() == 6  # 4 readings, 2 alerts
    recs = box.records()
    readings = [r for r in recs if r.kind is telemetry.Kind.READING]
    alerts = [r.fields["alert"] for r in recs if r.kind is telemetry.Kind.ALERT]
    assert sorted(alerts) == ["hyper", "hypo_severe"]  # none for the control solution
    by_seq = {r.fields["glu:key"].split(":")[1]: r.fields for r in readings}
    assert by_seq["2"]["glu:range"] == "high" and "glu:control" in by_seq["3"] and by_seq["4"]["glu:meal"] == "before"
