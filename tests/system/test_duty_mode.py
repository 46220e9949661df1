"""Duty mode: 24 simulated hours (one simulated hour = 2 real seconds; the reading interval and
``agent.wake_interval_s`` scaled alike, see testbed/duty.py), a reading every 4 hours, commands sent
while the box sleeps: every reading arrives once, every command runs once when the box wakes, and the
link was down between wake-ups. The idle figures of the run are printed (``pytest -s``)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from drivers.simulators.records import random_records
from testbed.duty import BACKEND_CLI, run_duty_box
from testbed.harness import LocalSystem, device_config


def test_a_duty_box_over_24_simulated_hours_loses_nothing_and_sleeps(tmp_path: Path) -> None:
    figures = run_duty_box(tmp_path, hours=24, hour_s=2.0, reading_every_h=4, wake_every_h=1, commands_while_asleep=3)
    print(figures)
    expected = [(m.meter_time.isoformat(), m.value_mgdl) for m in random_records("onetouch-ultra2", 6, seed=24)]
    assert sorted(figures.readings_stored) == sorted(expected)  # every reading, once
    assert len(figures.commands_sent) == 3
    assert all(n == 1 for n in figures.command_runs.values()), figures.command_runs  # every command, once
    assert all(status == "ok" for status in figures.command_results.values()), figures.command_results
    # The link came up for wake-ups and readings, not for good: about one connection per simulated hour
    # (24 wake-ups, plus one per reading and per command result at most), each closed again.
    assert 12 <= figures.connects <= 24 + 6 + 3 + 5, figures


def _set(system: LocalSystem, device_id: str, key: str, value: str) -> dict[str, object]:
    argv = [BACKEND_CLI, "command", device_id, "set_config", f"key={key}", f"value={value}",
            "--home", str(system.home.root), "--port", str(system.broker.port), "--timeout", "60"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert proc.stdout.strip(), proc.stderr
    return dict(json.loads(proc.stdout))


def test_link_mode_is_switched_live_by_set_config(tmp_path: Path) -> None:
    """agent.link applies without a restart: an always-on box told `duty` goes down and sleeps; told
    `always` at its next wake-up, it stays up."""
    with LocalSystem(tmp_path / "sys") as system:
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        config = device_config(state / "glucoagent.uci", [], agent={"wake_interval_s": "3"})
        system.start_agent(state, config)
        device_id = str(json.loads((state / "device.json").read_text())["device_id"])
        log = state / "agent.log"
        assert system.wait_for(lambda: _status(system, device_id) == "online", timeout=30), log.read_text()[-2000:]

        r = _set(system, device_id, "agent.link", "duty")
        assert (r["status"], r["code"]) == ("ok", "applied"), r
        assert system.wait_for(lambda: "duty mode: link down" in log.read_text(), timeout=30), log.read_text()[-2000:]
        assert system.wait_for(lambda: _status(system, device_id) == "offline", timeout=30)

        r = _set(system, device_id, "agent.link", "always")  # delivered when the box next wakes (3 s)
        assert (r["status"], r["code"]) == ("ok", "applied"), r
        downs = log.read_text().count("duty mode: link down")
        time.sleep(8)  # more than two wake intervals: a duty box would have gone down again by now
        assert log.read_text().count("duty mode: link down") == downs, log.read_text()[-2000:]
        assert _status(system, device_id) == "online"
        assert "option link 'always'" in config.read_text()


def _status(system: LocalSystem, device_id: str) -> str | None:
    rows = system.db.query("SELECT status FROM devices WHERE device_id = ?", (device_id,))
    return str(rows[0][0]) if rows else None
