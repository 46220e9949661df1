"""A box whose clock is unset (1970), at the image's build date, or years ahead, with no NTP: it still
connects (validity window relaxed, chain and name checked), learns the cloud's signed time, steps its
clock, uploads every reading once, and the backend corrects the times of the readings taken before.
The wall clock is shifted for the agent's processes only by testbed/clockshim.py (libfaketime cannot
run Python 3.11 here); ``agent.settime_command`` steps that shim instead of the system clock."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from backend.timefix import corrected_times
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clockshim import build_clock_shim, settime_command
from testbed.harness import LocalSystem, device_config

DAY = 86_400
OFFSETS = {
    "1970": -(time.time() - 3 * DAY),  # a box without any clock: the epoch, plus uptime
    "image-build-date": -200 * DAY,  # before the broker's certificate was issued
    "years-ahead": 5 * 365 * DAY,  # after it expired (825 days)
}


@pytest.mark.parametrize("name", OFFSETS)
def test_box_with_a_wrong_clock_learns_the_signed_time_and_loses_nothing(tmp_path: Path, name: str) -> None:
    everything = random_records("onetouch-ultra2", 10, seed=17)
    records = tmp_path / "meter.json"
    records.write_text(dumps(everything))
    offset = tmp_path / "clock-offset"
    offset.write_text(str(OFFSETS[name]))
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyCLK"
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        state = system.device_dir()
        assert system.provision(state).returncode == 0  # at the factory: the real clock
        config = device_config(
            state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            agent={"port_scan_s": "0.3", "settime_command": settime_command(offset)},
            mqtt={"backoff_min_s": "0.2", "backoff_cap_s": "1"},
        )
        system.broker.stop()  # readings are taken before the box can reach the cloud
        started = time.time()
        system.start_agent(state, config, env=env)
        log = state / "agent.log"

        def buffered() -> int:
            out = system.glucoagent(state, "status", "--json", config=config)
            return int(json.loads(out.stdout)["buffer_depth"]) if out.returncode == 0 else -1

        assert system.wait_for(lambda: buffered() >= 10, timeout=60), log.read_text()[-3000:]
        system.broker.start()
        readings = lambda: system.db.records(kind="reading")  # noqa: E731
        assert system.wait_for(lambda: len(readings()) >= 10, timeout=90), log.read_text()[-3000:]
        text = log.read_text()
        assert "connecting to learn the cloud's signed time" in text, text[-3000:]
        assert "the cloud's signed time says the clock was off" in text, text[-3000:]
        # The clock was stepped to the authenticated time (within the round trip and the shim's rounding).
        assert abs(float(offset.read_text())) < 5, offset.read_text()

        stored = readings()
        keys = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored]
        assert sorted(keys) == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in everything)
        assert len(keys) == len(set(keys))  # every reading once
        # Signed with the wrong wall time, corrected at the backend by the box's anchor to when they were taken.
        assert all(abs(r.wall - time.time()) > 100 * DAY for r in stored)
        fixed = corrected_times(system.db, stored[0].device_id)
        ended = time.time()
        for r in stored:
            t = fixed[(r.stream, r.seq)]
            assert started - 5 < t < ended + 5, (r, t, started, ended)
        assert all(r.clock in ("unset", "unsynced", "synced") for r in stored)
        if name == "1970":
            assert all(r.clock == "unset" for r in stored)
        # After the step the box reports its clock from the cloud (or NTP, where the test host's kernel says so).
        health = system.db.records(kind="health")
        assert system.wait_for(
            lambda: any(h.fields.get("health:clock") in ("cloud", "synced") for h in system.db.records(kind="health")),
            timeout=30,
        ), [h.fields.get("health:clock") for h in health]
