"""The BLE central against simulated GLS meters and BLS cuffs over bumble virtual controllers on real ptys.

Each simulator runs a GATT server on one virtual controller; the central opens the other controller's
HCI UART (a pty) with ``serial:PATH`` exactly as it opens real hardware. Pairing is LE Secure Connections
with the simulator's passkey; the bond lives in a 0600 JSON key store and serves every later reconnect.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.ble import gls
from drivers.ble.central import BleCentral, GlsCursor
from drivers.errors import ControllerAbsent, DeviceOutOfRange, NotBonded, PairingRefused, WrongPasskey
from drivers.simulators import ble_bp, ble_glucose
from drivers.simulators.ble_glucose import GlsFaults, GlucoseMeter, demo_records, serve_in_thread

GLS = ble_glucose.DEFAULT_ADDRESS
BP = ble_bp.DEFAULT_ADDRESS


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.stops: list[tuple[threading.Thread, threading.Event]] = []
        self.n = 0

    def start(self, device: Any) -> BleCentral:
        self.n += 1
        link = str(self.tmp / f"ttyBLE{self.n}")
        self.stops.append(serve_in_thread(device, link))
        return BleCentral(link, self.tmp / f"bonds{self.n}.json", connect_timeout=3.0)

    def close(self) -> None:
        for thread, stop in self.stops:
            stop.set()
            thread.join(10)
            assert not thread.is_alive()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def _values(read: Any) -> list[tuple[int, int]]:
    return [(int(r.record_key.split(":")[1]), r.value_mgdl) for r in read.readings]


def test_300_records_passkey_bond_reconnect_nothing_new_then_only_the_new(rig: Rig) -> None:
    records = demo_records(300)
    meter = GlucoseMeter(records)
    central = rig.start(meter)

    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    store = central.keystore
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    db = json.loads(store.read_text())
    assert bytes.fromhex(db["glucoagent-identity"]["irk"]) != bytes(16)
    assert central.bonded() == [GLS]

    first = central.read_glucose(GLS)  # a bonded reconnect: encrypted with the stored keys
    assert first.complete and first.error is None and first.rejected == ()
    assert _values(first) == [(r.sequence, r.mgdl) for r in records]
    assert first.readings[0].meal.value == "before"  # record 1 carries a context (preprandial)
    assert first.cursor == GlsCursor(300, first.readings[-1].record_key)

    again = central.read_glucose(GLS, first.cursor)
    assert again.complete and again.readings == () and not again.restarted
    assert again.cursor == first.cursor

    meter.add_records(demo_records(5, dt.datetime(2026, 6, 1, 8, 0), first_sequence=301))
    more = central.read_glucose(GLS, again.cursor)
    assert more.complete and [s for s, _ in _values(more)] == [301, 302, 303, 304, 305]
    assert more.cursor is not None and more.cursor.sequence == 305
    assert meter.transfers == 3


def test_sequence_restart_is_recognised(rig: Rig) -> None:
    meter = GlucoseMeter(demo_records(20))
    central = rig.start(meter)
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    first = central.read_glucose(GLS)
    # memory reset: numbering starts again at 1, later times; more records than before
    meter.replace_records(demo_records(25, dt.datetime(2026, 7, 1, 6, 0)))
    after = central.read_glucose(GLS, first.cursor)
    assert after.restarted and after.complete
    assert len(after.readings) == 25
    assert not {r.record_key for r in after.readings} & {r.record_key for r in first.readings}
    # fewer records than the cursor's sequence: "no records found" is a restart too
    meter.replace_records(demo_records(3, dt.datetime(2026, 8, 1, 6, 0)))
    small = central.read_glucose(GLS, after.cursor)
    assert small.restarted and len(small.readings) == 3


def test_no_records_found(rig: Rig) -> None:
    central = rig.start(GlucoseMeter([]))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    read = central.read_glucose(GLS)
    assert read.complete and read.readings == () and read.cursor is None


def test_disconnect_mid_transfer_returns_only_what_verified_then_the_rest(rig: Rig) -> None:
    meter = GlucoseMeter(demo_records(50), GlsFaults(disconnect_after=20))
    central = rig.start(meter)
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    partial = central.read_glucose(GLS)
    assert not partial.complete and partial.error and "disconnected" in partial.error
    assert [s for s, _ in _values(partial)] == list(range(1, 21))
    rest = central.read_glucose(GLS, partial.cursor)
    assert rest.complete and [s for s, _ in _values(rest)] == list(range(21, 51))


def test_duplicate_notifications_are_dropped(rig: Rig) -> None:
    central = rig.start(GlucoseMeter(demo_records(30), GlsFaults(duplicate_every=1)))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    read = central.read_glucose(GLS)
    assert read.complete and [s for s, _ in _values(read)] == list(range(1, 31)) and read.rejected == ()


@pytest.mark.parametrize(
    "code", [gls.Response.OP_CODE_NOT_SUPPORTED, gls.Response.OPERATOR_NOT_SUPPORTED, gls.Response.PROCEDURE_NOT_COMPLETED]
)
def test_racp_errors_are_clear(rig: Rig, code: gls.Response) -> None:
    from drivers.errors import RecordAccessError

    central = rig.start(GlucoseMeter(demo_records(5), GlsFaults(racp_error=int(code))))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    with pytest.raises(RecordAccessError, match=gls.RESPONSE_TEXT[code]) as caught:
        central.read_glucose(GLS)
    assert caught.value.exit_code == 28


def test_slow_meter_times_out_with_abort_and_partial(rig: Rig) -> None:
    central = rig.start(GlucoseMeter(demo_records(10), GlsFaults(slow_s=2.0)))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    read = central.read_glucose(GLS, procedure_timeout=0.5)
    assert not read.complete and read.error and "timed out, aborted" in read.error
    assert read.readings == ()


def test_garbage_sfloats_are_rejected_never_numbers(rig: Rig) -> None:
    central = rig.start(GlucoseMeter(demo_records(10), GlsFaults(garbage=frozenset({3, 7}))))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    read = central.read_glucose(GLS)
    assert read.complete and [s for s, _ in _values(read)] == [1, 2, 4, 5, 6, 8, 9, 10]
    assert len(read.rejected) == 2 and all("NaN" in m for m in read.rejected)
    assert read.cursor is not None and read.cursor.sequence == 10  # a rejected record is not read again


def test_distinct_errors_wrong_passkey_just_works_not_bonded_out_of_range_absent(rig: Rig, tmp_path: Path) -> None:
    central = rig.start(GlucoseMeter(demo_records(2)))
    with pytest.raises(NotBonded) as not_bonded:
        central.read_glucose(GLS)
    with pytest.raises(WrongPasskey) as wrong:
        central.pair(GLS, lambda: 111111)
    with pytest.raises(PairingRefused, match="requires its passkey") as refused:
        central.pair(GLS, None)
    assert central.bonded() == []
    with pytest.raises(DeviceOutOfRange) as away:
        central.pair("C4:10:00:00:99:99", lambda: 1)
    with pytest.raises(ControllerAbsent) as absent:
        BleCentral(str(tmp_path / "ttyNONE"), tmp_path / "k.json").scan(0.2)
    errors = [not_bonded.value, wrong.value, refused.value, away.value, absent.value]
    assert len({e.exit_code for e in errors}) == 5
    assert len({str(e) for e in errors}) == 5


def test_silent_meter_is_out_of_range_and_scan_lists_health_devices(rig: Rig) -> None:
    central = rig.start(GlucoseMeter(demo_records(2), GlsFaults(silent=True)))
    assert central.scan(0.5) == []
    with pytest.raises(DeviceOutOfRange, match="not seen advertising"):
        central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    other = rig.start(ble_bp.BpCuff(ble_bp.demo_records(1)))
    (seen,) = other.scan(0.5)
    assert (seen.address, seen.name, seen.services) == (BP, "BP Cuff SIM", ("blood-pressure",))
    assert -127 <= seen.rssi <= 20


def test_unpair_forgets_the_bond(rig: Rig) -> None:
    central = rig.start(GlucoseMeter(demo_records(2)))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    assert central.unpair(GLS) and central.bonded() == [] and not central.unpair(GLS)
    with pytest.raises(NotBonded):
        central.read_glucose(GLS)


# --- blood pressure --------------------------------------------------------------------------------
def test_bp_cuff_40_measurements_duplicates_dropped(rig: Rig) -> None:
    records = ble_bp.demo_records(40)
    central = rig.start(ble_bp.BpCuff(records, ble_bp.BpFaults(duplicate_every=4)))
    central.pair(BP, lambda: ble_bp.DEFAULT_PASSKEY)
    read = central.read_bp(BP)
    assert read.complete and read.rejected == () and read.repeats == 10
    assert [(int(r.systolic_mmhg), int(r.diastolic_mmhg), int(r.pulse_bpm or 0)) for r in read.readings] == [
        (r.systolic, r.diastolic, r.pulse) for r in records
    ]
    assert [r.device_time for r in read.readings] == [r.time for r in records]
    assert len({r.record_key for r in read.readings}) == 40
    # the cuff sends them all again next time: same keys, so the agent's ledger stores nothing new
    again = central.read_bp(BP)
    assert [r.record_key for r in again.readings] == [r.record_key for r in read.readings]


def test_bp_disconnect_mid_transfer_and_garbage(rig: Rig) -> None:
    records = ble_bp.demo_records(12)
    central = rig.start(
        ble_bp.BpCuff(records, ble_bp.BpFaults(disconnect_after=5, garbage=frozenset({8}), stay_connected=True))
    )
    central.pair(BP, lambda: ble_bp.DEFAULT_PASSKEY)
    partial = central.read_bp(BP, quiet_s=2.0)
    assert len(partial.readings) == 5 and partial.rejected == ()
    full = central.read_bp(BP, quiet_s=2.0)  # stays connected: the quiet timeout ends the read
    assert full.complete and len(full.readings) == 11
    assert len(full.rejected) == 1 and "systolic is NaN" in full.rejected[0]


def test_no_secret_reaches_the_log_even_at_debug(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    central = rig.start(GlucoseMeter(demo_records(3)))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    central.read_glucose(GLS)
    db = json.loads(central.keystore.read_text())
    secrets = [db["glucoagent-identity"]["irk"], str(ble_glucose.DEFAULT_PASSKEY)]
    secrets += [v["value"] for v in db["glucoagent"][GLS].values() if isinstance(v, dict) and "value" in v]
    assert len(secrets) >= 3
    # the simulated meter's own "display" line shows its passkey, as the meter would: not the box's log
    box = [r for r in caplog.records if not r.name.startswith("drivers.simulators")]
    assert box  # debug logging was on and captured
    text = "\n".join(r.getMessage() for r in box).lower()
    for secret in secrets:
        assert secret.lower() not in text


def test_a_port_without_a_controller_behind_it(tmp_path: Path) -> None:
    from drivers.errors import ControllerNotResponding
    from drivers.simulators.pty_link import PtyLink

    with PtyLink(tmp_path / "ttySILENT"), pytest.raises(ControllerNotResponding, match="does not answer HCI") as caught:
        BleCentral(str(tmp_path / "ttySILENT"), tmp_path / "k.json").scan(0.2)
    assert caught.value.exit_code == 22


def test_flags_travel_over_the_air(rig: Rig) -> None:
    from drivers.models import RangeFlag
    from drivers.simulators.ble_glucose import GlsRecord

    t = dt.datetime(2026, 4, 1, 9, 0)
    records = [
        GlsRecord(1, t, 600, status=int(gls.Status.RESULT_HIGH)),
        GlsRecord(2, t + dt.timedelta(hours=1), 20, status=int(gls.Status.RESULT_LOW | gls.Status.BATTERY_LOW)),
        GlsRecord(3, t + dt.timedelta(hours=2), 120, control=True),
        GlsRecord(4, t + dt.timedelta(hours=3), 95, meal=3, status=int(gls.Status.SAMPLE_TOO_SMALL)),
    ]
    central = rig.start(GlucoseMeter(records))
    central.pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
    high, low, control, fasting = central.read_glucose(GLS).readings
    assert (high.range_flag, high.value_mgdl) == (RangeFlag.HIGH, 600)
    assert (low.range_flag, low.comment) == (RangeFlag.LOW, "battery-low")
    assert control.control_solution and not high.control_solution
    assert fasting.meal.value == "fasting" and fasting.suspect and fasting.comment == "sample-too-small"
    assert [r.meter_time for r in (high, low, control, fasting)] == [r.time for r in records]
