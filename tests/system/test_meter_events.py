"""Meters are noticed by events, not by polling: with ``agent.port_scan_s`` at an hour, a real agent
reads a meter (a simulator on a real pseudo-terminal) that appears after it started, one unplugged and
plugged in again with a new reading, and one the hotplug script announces, each long before the next
poll could have found it. Without inotify (forced off in-process: it cannot be missing here) the same
watcher falls back to polling every ``port_scan_s``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent import devwatch
from agent.clock import Clock
from agent.config import AgentSection, Config, DevicePort
from agent.meters import MeterWatcher
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config, stop_process

HOUR = "3600"  # port_scan_s: a poll would come an hour late
EVENT_WAIT_S = 30  # generous on a shared machine; an hour-long poll cannot meet it


def test_meters_appearing_and_replugged_are_read_without_polling(tmp_path: Path) -> None:
    meter = random_records("onetouch-ultra2", 3, seed=41)  # newest first
    records = tmp_path / "meter.json"
    records.write_text(dumps(meter[1:]))
    tty = tmp_path / "ttyEVT"
    with LocalSystem(tmp_path / "sys") as system:
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        config = device_config(
            state / "glucoagent.uci", [(str(tty), "onetouch-ultra2")], agent={"port_scan_s": HOUR, "reread_s": "86400"}
        )
        system.start_agent(state, config)
        log = state / "agent.log"
        assert system.wait_for(lambda: "glucoagent running" in log.read_text(), timeout=30)
        assert "device present" not in log.read_text()  # nothing plugged in yet

        sim = system.start_simulator("onetouch-ultra2", tty, records, "--baud", "0")  # plugged in after start
        got = system.wait_for(lambda: len(system.db.records(kind="reading")) == 2, timeout=EVENT_WAIT_S)
        assert got, log.read_text()[-3000:]

        stop_process(sim)  # unplugged; the new reading is taken; plugged in again
        system.procs.remove(sim)
        records.write_text(dumps(meter))
        system.start_simulator("onetouch-ultra2", tty, records, "--baud", "0")
        got = system.wait_for(lambda: len(system.db.records(kind="reading")) == 3, timeout=EVENT_WAIT_S)
        assert got, log.read_text()[-3000:]
        stored = sorted((r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in system.db.records(kind="reading"))
        assert stored == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in meter)  # each once


def test_a_hotplug_notice_is_taken_at_once(tmp_path: Path) -> None:
    meter = random_records("contour-astm", 4, seed=43)
    records = tmp_path / "contour.json"
    records.write_text(dumps(meter))
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyHOTEVT"
        system.start_simulator("contour-astm", link, records, "--baud", "0")
        name = f"ttyGLUCOEVT{os.getpid()}"
        dev = Path("/dev") / name  # hotplug names devices under /dev, as the kernel does
        dev.symlink_to(os.path.realpath(link))
        try:
            state = system.device_dir()
            assert system.provision(state).returncode == 0
            config = device_config(state / "glucoagent.uci", [], agent={"port_scan_s": HOUR})  # no ports at all
            system.start_agent(state, config)
            log = state / "agent.log"
            assert system.wait_for(lambda: "glucoagent running" in log.read_text(), timeout=30)
            assert system.glucoagent(state, "hotplug", "add", name, config=config).returncode == 0
            got = system.wait_for(lambda: len(system.db.records(kind="reading")) == 4, timeout=EVENT_WAIT_S)
            assert got, log.read_text()[-3000:]
        finally:
            dev.unlink()


class _Counting(MeterWatcher):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, recorder=None, clock=Clock(), on_stored=lambda: None)  # type: ignore[arg-type]
        self.read = threading.Event()

    def read_port(self, port: DevicePort) -> int:
        self.read.set()
        return 0


@pytest.mark.parametrize("inotify", [True, False])
def test_the_watcher_notices_a_pty_with_and_without_inotify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool
) -> None:
    if not inotify:
        monkeypatch.setattr(devwatch.DirWatch, "open", classmethod(lambda cls: None))
    port = tmp_path / "dev" / "ttyPTY"  # its directory does not exist yet: the nearest one is watched
    cfg = Config(
        agent=AgentSection(state_dir=tmp_path / "state", port_scan_s=3600 if inotify else 0.3),
        ports=(DevicePort(name="m", port=str(port), protocol="onetouch-ultra2"),),
    )
    watcher = _Counting(cfg)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    master, slave = os.openpty()
    try:
        assert not watcher.read.wait(0.5)
        port.parent.mkdir()
        port.symlink_to(os.ttyname(slave))
        assert watcher.read.wait(EVENT_WAIT_S)
        assert watcher.events is inotify
    finally:
        watcher.stop()
        thread.join(timeout=5)
        os.close(master)
        os.close(slave)
        assert not thread.is_alive()
