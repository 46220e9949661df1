"""The box's clock jumps (no battery clock; a bad NTP step): the agent logs why the broker's certificate
fails, keeps taking readings (marked with the clock's quality), connects with the validity window relaxed
to learn the cloud's signed time, steps its clock back (``agent.settime_command`` moves the shim), and
loses or doubles nothing; the backend corrects the wrong wall times by the box's anchor. The wall clock is shifted for the agent's process only, by a small
LD_PRELOAD shim (the one `make soak` uses) that moves CLOCK_REALTIME and leaves monotonic time alone."""

from __future__ import annotations

import os
import time
from pathlib import Path

from backend.timefix import corrected_times
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clockshim import build_clock_shim, settime_command
from testbed.harness import LocalSystem, device_config

YEARS_25 = 25 * 365 * 86_400


def test_clock_jumping_back_to_2001_and_forward_again_loses_nothing(tmp_path: Path) -> None:
    everything = random_records("onetouch-ultra2", 20, seed=41)  # newest first
    records = tmp_path / "meter.json"
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyCLOCK"
        records.write_text(dumps(everything[10:]))  # the meter holds the 10 oldest at first
        sim = system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        config = device_config(
            state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            agent={"reread_s": "10", "port_scan_s": "0.3", "settime_command": settime_command(offset)},
            mqtt={"backoff_min_s": "0.2", "backoff_cap_s": "2"},
        )
        started = time.time()
        system.start_agent(state, config, env=env)
        readings = lambda: system.db.records(kind="reading")  # noqa: E731
        assert system.wait_for(lambda: len(readings()) >= 10, timeout=60)

        # The clock falls back 25 years; the link is re-established under it (broker restart).
        offset.write_text(str(-YEARS_25))
        time.sleep(0.5)  # the shim re-reads its file every 0.2 s: the jump is in force before the reconnect
        system.broker.restart()
        log = state / "agent.log"
        assert system.wait_for(lambda: "not yet valid by this box's clock" in log.read_text(), timeout=30), (
            log.read_text()[-3000:]
        )
        # New readings are still taken.
        records.write_text(dumps(everything))
        os.killpg(sim.pid, 15)
        sim.wait()
        system.procs.remove(sim)
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        # No NTP: the box learns the cloud's signed time and steps its clock back itself.
        assert system.wait_for(lambda: len(readings()) >= 20, timeout=90), log.read_text()[-3000:]
        assert "connecting to learn the cloud's signed time" in log.read_text()
        assert abs(float(offset.read_text())) < 5, offset.read_text()
        stored = readings()
        keys = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored]
        assert sorted(keys) == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in everything)
        assert len(keys) == len(set(keys))
        # Readings taken while the clock was wrong say so and carry a wall time of 2001 (which of the 10 new
        # ones were taken before the step depends on timing); every reading's time is corrected at the backend.
        late = [r for r in stored if r.clock == "unset"]
        assert all(r.wall < 1_000_000_000 + 10 * 365 * 86_400 for r in late)
        fixed = corrected_times(system.db, stored[0].device_id)
        assert all(started - 5 < fixed[(r.stream, r.seq)] < time.time() + 5 for r in stored)
        seqs = sorted(r.seq for r in system.db.records() if r.stream == "c")
        assert seqs == list(range(1, len(seqs) + 1))
