"""SIGKILL the agent during GLS transfers, at random points, many times: nothing lost, nothing doubled, and the
ledger (where the next read starts) never ahead of the records stored with it. Then the backend holds every
record the meter ever had, exactly once.

The meter runs in this process on a bumble virtual controller whose HCI is a real pty; the agent is a real
process killed with SIGKILL; the buffer is read from its SQLite file after each kill.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ble_source import GLUCOSE, keystore_path, remember_device
from drivers.ble.central import BleCentral
from drivers.simulators import ble_glucose
from testbed.harness import LocalSystem, device_config

GLS = ble_glucose.DEFAULT_ADDRESS
SOURCE = f"ble-glucose:{GLS}"
KILLS = 50
NEW_PER_ROUND = 6  # the meter takes this many records before each start, so every kill hits a real transfer


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("ble-crash")) as s:
        yield s


def buffer_state(db_path: Path) -> tuple[set[str], int]:
    """(ledger keys of the meter, reading rows), after checking every ledger row points at a stored reading."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ledger = db.execute("SELECT record_key, seq FROM ledger WHERE source = ?", (SOURCE,)).fetchall()
        readings = {s for (s,) in db.execute("SELECT seq FROM outbox WHERE stream = 'c' AND kind = 'reading'")}
    finally:
        db.close()
    ahead = [key for key, seq in ledger if seq not in readings]
    assert not ahead, f"ledger ahead of the records: {ahead[:5]}"
    return {key for key, _ in ledger}, len(readings)


def test_sigkill_during_gls_transfers_loses_and_doubles_nothing(system: LocalSystem) -> None:
    records = ble_glucose.demo_records(300 + KILLS * NEW_PER_ROUND)
    meter = ble_glucose.GlucoseMeter(records[:300], ble_glucose.GlsFaults(slow_s=0.03))
    link = system.run / "ttyBLEcrash"
    thread, stop = ble_glucose.serve_in_thread(meter, str(link))
    try:
        assert system.wait_for(link.exists, timeout=15)
        state = system.device_dir("ble-crash")
        prov = system.provision(state, "patient-ble-crash")
        assert prov.returncode == 0, prov.stdout + prov.stderr
        device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
        BleCentral(str(link), keystore_path(state)).pair(GLS, lambda: ble_glucose.DEFAULT_PASSKEY)
        remember_device(state, GLS, GLUCOSE, "Glucose Meter SIM", "radio")
        config = device_config(state / "glucoagent.uci", [])
        config.write_text(config.read_text() + f"\nconfig ble 'radio'\n\toption port '{link}'\n\toption scan_s '1'\n")
        rng = random.Random(1515)
        held = 300
        started = time.monotonic()
        for i in range(KILLS):
            transfers = meter.transfers
            agent = system.start_agent(state, config)
            assert system.wait_for(lambda t=transfers: meter.transfers > t, timeout=30), (state / "agent.log").read_text()[-2000:]  # fmt: skip
            # 0.03 s a record: the first transfer (300) takes ~9 s, the later ones (~7) ~0.2 s. Kill anywhere in
            # it, or just after, while its records are being stored.
            time.sleep(rng.uniform(0.0, 9.5 if i == 0 else 0.35))
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(10)
            keys, rows = buffer_state(state / "buffer.db")
            assert rows == len(keys), f"kill {i}: {rows} reading rows for {len(keys)} ledger keys (doubled)"
            want = {f"gls:{r.sequence}:{r.time.isoformat()}" for r in records[:held]}
            assert keys <= want
            meter.add_records(records[held : held + NEW_PER_ROUND])
            held += NEW_PER_ROUND
        elapsed = time.monotonic() - started
        print(f"{KILLS} SIGKILLs in {elapsed:.0f} s")

        agent = system.start_agent(state, config)
        log = state / "agent.log"
        want_keys = {f"gls:{r.sequence}:{r.time.isoformat()}": r.mgdl for r in records}

        def delivered() -> int:
            return len(system.db.records(device_id=device_id, kind="reading"))

        assert system.wait_for(lambda: delivered() >= len(records), timeout=120), log.read_text()[-3000:]
        time.sleep(2)
        stored = system.db.records(device_id=device_id, kind="reading")
        assert {r.fields["glu:key"]: r.fields["glu:mgdl"] for r in stored} == want_keys
        assert len(stored) == len(records)  # exactly once, across 50 crashes
        assert agent.poll() is None
        assert json.loads((state / "run" / "status.json").read_text())["ble_loaded"] is True
    finally:
        stop.set()
        thread.join(10)
