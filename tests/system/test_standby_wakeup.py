"""A box installed before it is provisioned, or with a config it cannot use: `glucoagent run` (what procd
starts) stays up and idle instead of exiting into procd's respawn loop, and starts by itself as soon
as the credentials or the config are there. Real processes: broker, backend, agent, meter simulator.

The waiting box's CPU is read from /proc/<pid>/stat (utime + stime) over GLUCOAGENT_STANDBY_S seconds
(default 20; the figure in docs/openwrt.md is from 600). The bound checked is only "not a busy loop".
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config

WAIT_S = float(os.environ.get("GLUCOAGENT_STANDBY_S", "20"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def _meter(system: LocalSystem, tmp_path: Path, n: int, seed: int) -> Path:
    records = tmp_path / "meter.json"
    records.write_text(dumps(random_records("contour-astm", n, seed=seed)))
    link = tmp_path / "ttyMETER"
    system.start_simulator("contour-astm", link, records, "--baud", "0")
    return link


def test_unprovisioned_box_waits_idle_and_starts_once_provisioned(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        link = _meter(system, tmp_path, 6, seed=5)
        state = system.device_dir()
        config = device_config(state / "glucoagent.uci", [(str(link), "contour-astm")])
        agent = system.start_agent(state, config)
        log = state / "agent.log"
        assert system.wait_for(lambda: "not provisioned" in log.read_text(), timeout=30), log.read_text()
        assert system.wait_for(lambda: agent.poll() is None, timeout=1)

        before, started = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(WAIT_S)
        used, waited = cpu_seconds(agent.pid) - before, time.monotonic() - started
        print(f"\nwaiting unprovisioned box: {used:.2f} CPU s in {waited:.0f} s")
        assert agent.poll() is None, log.read_text()  # still the same process: nothing exited, nothing respawned
        assert log.read_text().count("not provisioned") == 1  # said once, not once per check
        assert used < 0.25 * waited, f"{used} CPU s in {waited} s: a busy loop"

        prov = system.provision(state)
        provisioned = time.monotonic()
        assert prov.returncode == 0, prov.stderr
        assert system.wait_for(lambda: len(system.db.records(kind="reading")) >= 1, timeout=60, poll=0.05), log.read_text()
        print(f"provision finished -> first reading uploaded: {time.monotonic() - provisioned:.1f} s, no restart")
        assert system.wait_for(lambda: len(system.db.records(kind="reading")) >= 6, timeout=60), log.read_text()
        assert agent.poll() is None
        assert log.read_text().count("not provisioned") == 1  # provisioning wrote five files: still said once


def test_bad_config_is_logged_once_and_the_fixed_file_is_picked_up(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        link = _meter(system, tmp_path, 4, seed=9)
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        config = state / "glucoagent.uci"
        good = device_config(tmp_path / "good.uci", [(str(link), "contour-astm")]).read_text()
        config.write_text(good + "config meter 'm2'\n\toption port '/dev/ttyUSB9\n")  # unterminated quote
        agent = system.start_agent(state, config)
        log = state / "agent.log"
        expected = f"cannot start: {config}:"
        assert system.wait_for(lambda: expected in log.read_text(), timeout=30), log.read_text()
        assert "EOF with unterminated '" in log.read_text()
        before = cpu_seconds(agent.pid)
        time.sleep(6)  # three checks
        assert agent.poll() is None
        assert log.read_text().count(expected) == 1
        assert cpu_seconds(agent.pid) - before < 1.5

        tmp = config.with_name(".glucoagent.uci.new")  # as `uci commit` does: a new file renamed over the old
        tmp.write_text(good)
        tmp.rename(config)
        assert system.wait_for(lambda: len(system.db.records(kind="reading")) >= 4, timeout=60), log.read_text()[-3000:]
        assert agent.poll() is None


def test_sigterm_while_waiting_stops_at_once(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        state = system.device_dir()
        config = device_config(state / "glucoagent.uci", [])
        agent = system.start_agent(state, config)
        log = state / "agent.log"
        assert system.wait_for(lambda: "not provisioned" in log.read_text(), timeout=30), log.read_text()
        os.kill(agent.pid, signal.SIGTERM)
        try:
            assert agent.wait(timeout=10) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError("the waiting agent ignored SIGTERM") from None
