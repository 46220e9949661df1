"""A meter on a port nobody configured: the hotplug script announces it, the agent probes the protocol
(read-only queries), reads it, and a second announcement of the same meter stores nothing new."""

from __future__ import annotations

import os
from pathlib import Path

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config


def test_hotplugged_meter_is_probed_read_and_not_doubled(tmp_path: Path) -> None:
    meter = random_records("contour-astm", 12, seed=31)
    records = tmp_path / "contour.json"
    records.write_text(dumps(meter))
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyHOT"
        system.start_simulator("contour-astm", link, records, "--baud", "0")
        name = f"ttyGLUCOTEST{os.getpid()}"
        dev = Path("/dev") / name  # hotplug names devices under /dev, as the kernel does
        dev.symlink_to(os.path.realpath(link))
        try:
            state = system.device_dir()
            assert system.provision(state).returncode == 0
            config = device_config(state / "glucoagent.uci", [], agent={"port_scan_s": "0.3"})  # no ports at all
            system.start_agent(state, config)
            log = state / "agent.log"
            added = system.glucoagent(state, "hotplug", "add", name, config=config)
            assert added.returncode == 0, added.stderr
            assert system.wait_for(lambda: len(system.db.records(kind="reading")) >= 12, timeout=60), log.read_text()[-3000:]
            assert f"hotplug: /dev/{name} appeared" in log.read_text()
            stored = sorted((r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in system.db.records(kind="reading"))
            assert stored == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in meter)

            again = system.glucoagent(state, "hotplug", "add", name, config=config)  # unplugged and plugged again
            assert again.returncode == 0
            assert system.wait_for(lambda: log.read_text().count("12 records, 0 new") >= 1, timeout=30), log.read_text()[-3000:]
            assert len(system.db.records(kind="reading")) == 12
        finally:
            dev.unlink()
