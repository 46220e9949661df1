"""Insulin doses take the same path as glucose readings: pen reader on a pty -> agent ->
signed records in the buffer -> MQTT/TLS -> backend verifies and stores them, once."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path

from testbed.harness import LocalSystem, device_config


def test_doses_arrive_verified_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(8)
    clock = 6_206_432
    times = sorted(rng.sample(range(clock - 30 * 86_400, clock - 600), 25), reverse=True)
    doses = [{"relative_time_s": t, "units": str(Decimal(rng.randint(30, 400)).scaleb(-1))} for t in times]
    doc = {"serial": "PENE2E", "clock_s": clock, "doses": doses}
    dose_file = tmp_path / "doses.json"
    dose_file.write_text(json.dumps(doc))
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyPEN"
        system.start_simulator("novopen", link, None, "--doses", str(dose_file))
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        config = device_config(state / "glucoagent.uci", [(str(link), "novopen")], agent={"port_scan_s": "1"})
        system.start_agent(state, config)
        assert system.wait_for(lambda: len(system.db.records(kind="dose")) >= 25, timeout=90), (
            (state / "agent.log").read_text()[-3000:]
        )
        # The reader is polled on every scan: later reads of the same pen store nothing new.
        assert not system.wait_for(lambda: len(system.db.records(kind="dose")) > 25, timeout=5)
        stored = system.db.records(kind="dose")
        got = sorted((r.fields["ins:relative_time"], str(Decimal(str(r.fields["ins"])))) for r in stored)
        want = sorted((d["relative_time_s"], str(Decimal(d["units"]))) for d in doses)
        assert got == want
        assert {r.fields["ins:pen"] for r in stored} == {"PENE2E"}
        assert all(r.fields["ins:pen_clock"] >= r.fields["ins:relative_time"] for r in stored)
