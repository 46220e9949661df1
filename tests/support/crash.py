"""The SIGKILL crash loop (tests/system/test_crash.py, and its cloud-profile variants): kill the agent at random
moments during intake and upload while the meter's memory grows, then audit what the backend holds."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem

TOTAL = 240  # readings the meter ends up holding
AGENT = {"port_scan_s": "0.2", "reread_s": "10", "health_interval_s": "3600"}
MQTT = {"batch_records": "7", "ack_timeout_s": "5", "backoff_min_s": "0.1", "backoff_cap_s": "1"}


def integrity(db: Path) -> str:
    con = sqlite3.connect(db, timeout=5)  # also rolls back a hot journal left by the kill
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def crash_loop(system: LocalSystem, state: Path, config: Path, link: Path, kills_wanted: int, seed: int) -> int:
    """Kill the agent ``kills_wanted`` times, let a last one drain, and check every reading is stored once
    with a gap-free clinical sequence and the buffer intact after every kill. Returns the kills made."""
    rng = random.Random(seed)
    grow_every = max(1, kills_wanted // 12)  # the meter gains readings as the test goes on
    everything = random_records("onetouch-ultra2", TOTAL, seed=99)  # newest first
    records_file = link.parent / f"{link.name}.json"
    held = 0
    sim = None
    kills = 0
    while kills < kills_wanted:
        if kills % grow_every == 0 and held < TOTAL:
            held = min(TOTAL, held + max(1, TOTAL // 12))
            records_file.write_text(dumps(everything[-held:]))  # the oldest `held`, still newest first
            if sim is not None:
                os.killpg(sim.pid, signal.SIGKILL)
                sim.wait()
                system.procs.remove(sim)
            sim = system.start_simulator("onetouch-ultra2", link, records_file, "--baud", "0")
        agent = system.start_agent(state, config)
        time.sleep(rng.uniform(0.3, 1.6))  # start-up, meter read, signing, upload: somewhere in there
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        system.procs.remove(agent)
        kills += 1
        assert integrity(state / "buffer.db") == "ok", f"after kill {kills}"

    # Let a final agent finish the job undisturbed.
    records_file.write_text(dumps(everything))
    assert sim is not None
    os.killpg(sim.pid, signal.SIGKILL)
    sim.wait()
    system.procs.remove(sim)
    system.start_simulator("onetouch-ultra2", link, records_file, "--baud", "0")
    system.start_agent(state, config)
    readings: Callable[[], list[object]] = lambda: system.db.records(kind="reading")  # noqa: E731
    assert system.wait_for(lambda: len(readings()) >= TOTAL, timeout=120), (state / "agent.log").read_text()[-4000:]
    time.sleep(2)  # a late duplicate would show up now

    stored = system.db.records(kind="reading")
    keys = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored]
    assert len(keys) == len(set(keys)), "a reading was stored twice"
    assert set(keys) == {(m.meter_time.isoformat(), m.value_mgdl) for m in everything}
    seqs = sorted(r.seq for r in system.db.records() if r.stream == "c")
    assert seqs == list(range(1, len(seqs) + 1)), "gap in the clinical sequence numbers"
    return kills
