"""`make demo` (``python -m testbed.demo``): the whole loop on one machine, on the embedded defaults.

Starts mosquitto (mutual TLS, per-device ACLs), the reference backend, a
simulated OneTouch Ultra 2 on a pseudo-terminal; provisions a fresh device
through the real claim flow with a one-time token; runs the agent; prints each
reading (and, with ``--bp N``, each measurement of a paired Bluetooth blood-pressure cuff) as the backend
verifies it; ends with ``delivered N/N, lost 0,
duplicates 0``. Everything goes under one run directory; everything started is stopped.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent.cli import dispatch
from agent.wire import telemetry
from backend.db import BackendDb
from drivers.models import GlucoseReading
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config

PATIENT = "demo-patient-0001"
PROTOCOL = "onetouch-ultra2"
HEADER = f"{'device':<16} {'seq':>4} {'meter time':<19} {'value':>6} {'unit':<6} {'flags':<16} signature"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(records: int = 20, timeout_s: float = 60.0, run_root: Path = Path("runs"), bp: int = 0) -> int:
    run = (run_root / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    _say(f"demo: everything goes under {run}")
    system = LocalSystem(run)
    shown: list[tuple[str, telemetry.Record]] = []
    lock = threading.Lock()

    def on_record(device_id: str, rec: telemetry.Record) -> None:
        with lock:
            shown.append((device_id, rec))

    system.on_record = on_record
    try:
        system.start()
        _say(f"demo: mosquitto on {system.broker.endpoint} (TLS 1.2+, client certificates required, per-device ACLs)")
        _say("demo: reference backend connected (provisioning CA, ingest verifier, command signer)")
        return _run(system, records, timeout_s, shown, lock, bp)
    finally:
        system.stop()
        _say("demo: stopped agent, simulator, backend and broker")


def _run(
    system: LocalSystem,
    n: int,
    timeout_s: float,
    shown: list[tuple[str, telemetry.Record]],
    lock: threading.Lock,
    bp: int = 0,
) -> int:
    meter_records = random_records(PROTOCOL, n, seed=2026)
    records_file = system.run / "meter-records.json"
    records_file.write_text(dumps(meter_records))
    link = system.run / "ttyMETER0"
    system.start_simulator(PROTOCOL, link, records_file)
    _say(f"demo: simulated OneTouch Ultra 2 with {n} readings on {link}")
    state = system.device_dir()
    config = device_config(system.run / "glucoagent.uci", [(str(link), "auto")])
    _say(f"demo: clinic issues a one-time enrolment token for {PATIENT}; provisioning a fresh device:")
    prov = system.provision(state, PATIENT)
    for line in (prov.stdout + prov.stderr).splitlines():
        _say(f"    {line}")
    if prov.returncode != 0:
        _say("demo: FAILED: provisioning failed")
        return 1
    if bp and not _pair_cuff(system, state, config, bp):
        return 1
    system.start_agent(state, config)
    _say("demo: agent running; readings as the backend verifies them:\n")
    _say(HEADER)
    _say("-" * len(HEADER))
    printed = 0

    def show_new() -> None:
        nonlocal printed
        with lock:
            fresh, printed = shown[printed:], len(shown)
        for device_id, rec in fresh:
            if rec.kind is telemetry.Kind.READING:
                _say(_row(device_id, rec))
            elif rec.kind is telemetry.Kind.BP:
                _say(_bp_row(device_id, rec))

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        show_new()
        if len(system.db.records(kind="reading")) >= n and len(system.db.records(kind="bp")) >= bp:
            time.sleep(1.0)  # let a late duplicate show up if there were one
            break
        time.sleep(0.2)
    show_new()
    if bp:
        stored = [r.fields.get("bp:key") for r in system.db.records(kind="bp")]
        _say(f"blood pressure: delivered {len(set(stored))}/{bp}, duplicates {len(stored) - len(set(stored))}")
    return _summary(system.db, meter_records)


def _row(device_id: str, rec: telemetry.Record) -> str:
    f = rec.fields
    value, _, unit = str(f.get("glu:native", "")).partition(" ")
    value = value.lstrip("0") or "0" if value.isdigit() else value
    flags = [
        str(f["glu:range"]) if f.get("glu:range") != "in" else "",
        str(f["glu:meal"]) + "-meal" if f.get("glu:meal") not in (None, "none") else "",
        "control" if "glu:control" in f else "",
        "suspect" if f.get("glu:suspect") else "",
    ]
    when = str(f.get("glu:meter_time", "")).replace("T", " ")
    return (
        f"{device_id:<16} {rec.seq:>4} {when:<19} {value:>6} {unit:<6} {','.join(x for x in flags if x) or '-':<16} ok"
    )


def _pair_cuff(system: LocalSystem, state: Path, config: Path, count: int) -> bool:
    """A simulated Bluetooth blood-pressure cuff, paired the technician's way (`glucoagent pair` + passkey)."""
    from drivers.simulators.ble_bp import DEFAULT_ADDRESS, DEFAULT_PASSKEY

    link = system.run / "ttyBLE0"
    system.start_simulator("ble-bp", link, None, "--count", str(count))
    config.write_text(config.read_text() + f"\nconfig ble 'radio'\n\toption port '{link}'\n\toption scan_s '5'\n")
    _say(f"demo: simulated Bluetooth blood-pressure cuff with {count} measurements; pairing with its passkey:")
    out = system.glucoagent(state, "pair", DEFAULT_ADDRESS, "--passkey", str(DEFAULT_PASSKEY), config=config)
    for line in (out.stdout + out.stderr).splitlines():
        _say(f"    {line}")
    return out.returncode == 0


def _bp_row(device_id: str, rec: telemetry.Record) -> str:
    """A blood-pressure record in the same table: systolic/diastolic (MAP) in the value column, pulse as a flag."""
    f = rec.fields
    sys_, dia = f.get(f"bp:{telemetry.MDC_PRESS_BLD_NONINV_SYS}"), f.get(f"bp:{telemetry.MDC_PRESS_BLD_NONINV_DIA}")
    pulse = f.get(f"bp:{telemetry.MDC_PULS_RATE_NON_INV}")
    when = str(f.get("bp:device_time", "-")).replace("T", " ")
    flags = ",".join(x for x in (f"pulse {pulse}" if pulse is not None else "", str(f.get("bp:status", ""))) if x)
    return f"{device_id:<16} {rec.seq:>4} {when:<19} {f'{sys_}/{dia}':>6} {'mmHg':<6} {flags or '-':<16} ok"


def _summary(db: BackendDb, meter_records: list[GlucoseReading]) -> int:
    """What the backend holds against what the meter held, compared by (meter time, value)."""
    stored = [(r.fields.get("glu:meter_time"), r.fields.get("glu:mgdl")) for r in db.records(kind="reading")]
    expected = {(r.meter_time.isoformat(), r.value_mgdl) for r in meter_records}
    delivered = len(set(stored) & expected)
    duplicates = len(stored) - len(set(stored))
    lost = len(expected) - delivered
    alerts = db.records(kind="alert")
    _say(f"\nalerts raised by the device (hypo/hyper, signed like readings): {len(alerts)}")
    _say(f"delivered {delivered}/{len(expected)}, lost {lost}, duplicates {duplicates}")
    return 0 if lost == 0 and duplicates == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.demo",
        description="Run the whole system on this machine and show readings arriving verified.",
    )
    parser.add_argument("--records", type=int, default=20, help="readings in the simulated meter")
    parser.add_argument("--bp", type=int, default=0, help="also a Bluetooth blood-pressure cuff with N measurements")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--run-root", type=Path, default=Path("runs"))
    parser.set_defaults(func=lambda a: run_demo(records=a.records, timeout_s=a.timeout, run_root=a.run_root, bp=a.bp))
    return dispatch(parser.parse_args(argv), "glucoagent-demo")


if __name__ == "__main__":
    sys.exit(main())
