"""Issue 16: SIGKILL at every step of an update, a release that starts but cannot connect, and the package
manager stopping the very agent that runs it (opkg's prerm) -- real agent processes, broker, cloud and
OpenWrt's opkg in an offline root (tests/support/update_rig.py). In every case: the outcome is reported once,
the right version runs, and the meter's readings reach the cloud each exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.update_rig import Box, Ipks, SlowShelf, make_box, release, two_versions

from agent.update.command import GATE_FILE
from agent.update.install import PENDING_FILE
from agent.update.pkgdb import read_marker
from agent.update.staging import PART_FILE, PROGRESS_FILE, UPDATE_DIR
from openwrt import hosttools
from testbed.harness import LocalSystem, stop_process

READINGS = 12
GATE_S = "30"  # the shortest the config allows


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("updkill")) as s:
        yield s


@pytest.fixture(scope="module")
def ipks(tmp_path_factory: pytest.TempPathFactory) -> Ipks:
    return two_versions(tmp_path_factory.mktemp("kill-ipks"))


def slow_installer(box: Box, where: Path, before_opkg: str) -> None:
    """The box's install command becomes a script that runs ``before_opkg`` and then the real opkg."""
    script = where / "install.sh"
    script.write_text(f'#!/bin/sh\n{before_opkg}\nexec {box.root.command_line} "$@"\n')
    box.update["install_command"] = f"sh {script}"
    box.write_config()


@pytest.fixture
def box(system: LocalSystem, openwrt_tools: hosttools.Tools, ipks: Ipks, tmp_path: Path) -> Iterator[Box]:
    b = make_box(system, openwrt_tools, ipks, tmp_path, gate_s=GATE_S)
    yield b
    if b.proc is not None:
        stop_process(b.proc)
    if system.service is None:
        system.start_backend()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sigkill(box: Box) -> None:
    """The agent alone, as procd's SIGKILL or the OOM killer would: not what it started in its own session."""
    assert box.proc is not None and box.proc.poll() is None, box.log()[-3000:]
    os.kill(box.proc.pid, signal.SIGKILL)
    box.proc.wait(timeout=10)


def marker(box: Box) -> dict[str, str] | None:
    return read_marker(box.state / UPDATE_DIR / PENDING_FILE)


def cloud_down(system: LocalSystem) -> None:
    """The broker stays up (the box connects), the cloud's service stops: no end-to-end ack."""
    system.stop_backend()
    system.service = None


def cloud_up(system: LocalSystem) -> None:
    system.start_backend()


def first_update(box: Box, system: LocalSystem, ipks: Ipks) -> str:
    """A meter attached, the agent started and uploading; the update from v1 to v2 sent. Its command id."""
    _, v1_ipk, _, v2_ipk = ipks
    m1, m2 = release(system, v1_ipk), release(system, v2_ipk)
    box.attach_meter(READINGS)
    box.start()
    assert system.wait_for(lambda: len(box.readings()) >= 1, 60), box.log()[-3000:]
    return box.send({"manifest": m2, "previous": m1})[0]


def settled(box: Box, cmd_id: str, want: tuple[str, str], running: str) -> tuple[str, str, str, object]:
    found = box.result(cmd_id)
    assert found[:2] == want, box.log()[-3000:]
    assert box.root.running == running
    box.audit(READINGS)
    assert box.results_made(cmd_id) == 1, box.log()[-3000:]
    return found


@pytest.mark.parametrize("step", ["download", "verify"])
def test_sigkill_before_the_install_changes_nothing(box: Box, system: LocalSystem, ipks: Ipks, step: str) -> None:
    v1, _, v2, _ = ipks
    assert system.service is not None
    real_shelf = system.service.releases
    system.service.releases = SlowShelf(system.home.releases.dir) if step == "download" else real_shelf
    progress = box.state / UPDATE_DIR / PROGRESS_FILE

    def reached() -> bool:
        try:
            p = json.loads(progress.read_text())
        except (OSError, ValueError):
            return False
        if p.get("version") != v2.ipk_version:
            return False
        return bool(p["next"] > 0) if step == "download" else bool(p["next"] == p["size"])

    try:
        cmd_id = first_update(box, system, ipks)
        assert system.wait_for(reached, 90, poll=0.0005), box.log()[-3000:]
        sigkill(box)
    finally:
        system.service.releases = real_shelf
    assert marker(box) is None, "the kill came after the install began"
    if step == "verify":  # all bytes in, not yet checked or kept
        assert (box.state / UPDATE_DIR / PART_FILE).stat().st_size == v2_size(ipks)
    box.start()
    settled(box, cmd_id, ("failed", "interrupted"), v1.ipk_version)
    assert box.health_shows(agent_version=v1.ipk_version, update_outcome="failed")["health:update_reason"]
    if step == "verify":  # sent again: the complete download is checked, installed, and passes its gate
        _, v1_ipk, _, v2_ipk = ipks
        again = box.send({"manifest": release(system, v2_ipk), "previous": release(system, v1_ipk)})[0]
        assert box.exited() == 0, box.log()[-3000:]
        size = v2_size(ipks)
        assert f"resuming {v2.ipk_version} at byte {size} of {size}" in box.log()  # nothing left to fetch
        box.start()
        settled(box, again, ("ok", "updated"), v2.ipk_version)


def v2_size(ipks: Ipks) -> int:
    return ipks[3].stat().st_size


def test_sigkill_during_the_install_the_package_manager_finishes(
    box: Box, system: LocalSystem, ipks: Ipks, tmp_path: Path
) -> None:
    _, _, v2, _ = ipks
    flag = tmp_path / "installing"
    slow_installer(box, tmp_path, f"touch {flag}; sleep 2")
    cmd_id = first_update(box, system, ipks)
    assert system.wait_for(flag.exists, 90, poll=0.01), box.log()[-3000:]
    sigkill(box)
    assert marker(box) is not None
    box.start()  # procd at once: this start waits for the package manager still running, then gates
    settled(box, cmd_id, ("ok", "updated"), v2.ipk_version)
    assert "the package manager is still installing; waiting for it" in box.log()


def test_the_package_managers_stop_of_the_agent_cannot_cut_the_install_off(
    box: Box, system: LocalSystem, ipks: Ipks, tmp_path: Path
) -> None:
    """On a box opkg's prerm runs ``/etc/init.d/glucoagent stop`` (procd: SIGTERM, SIGKILL if the agent
    lingers), opkg goes on printing what it does, and its postinst starts the agent again before opkg has
    written its database. Played here by the install command itself, before the real opkg runs."""
    _, _, v2, _ = ipks
    prerm = 'kill -TERM "$PPID"; sleep 1; kill -KILL "$PPID" 2>/dev/null; echo "Installing glucoagent"; sleep 2'
    slow_installer(box, tmp_path, prerm)
    cmd_id = first_update(box, system, ipks)
    assert box.exited() in (-signal.SIGKILL, -signal.SIGTERM, 0), box.log()[-3000:]
    assert box.root.running != v2.ipk_version  # opkg has not run yet
    box.start()  # as the postinst would: this start waits for the package manager, then gates
    settled(box, cmd_id, ("ok", "updated"), v2.ipk_version)
    assert "the package manager is still installing; waiting for it" in box.log()
    assert "Installing glucoagent" in (box.state / UPDATE_DIR / "install.log").read_text()


def test_sigkill_at_the_first_start_of_the_new_version(box: Box, system: LocalSystem, ipks: Ipks) -> None:
    _, _, v2, _ = ipks
    cmd_id = first_update(box, system, ipks)
    assert box.exited() == 0, box.log()[-3000:]
    cloud_down(system)  # so this start cannot pass its gate before the kill
    try:
        before = box.log().count("was cut off by a stop or crash")
        box.start(connected=False)
        assert system.wait_for(lambda: box.log().count("was cut off by a stop or crash") > before, 30)
        sigkill(box)
        assert marker(box) is not None
    finally:
        cloud_up(system)
    box.start()
    settled(box, cmd_id, ("ok", "updated"), v2.ipk_version)
    assert box.health_shows(agent_version=v2.ipk_version, update_outcome="kept")


def test_sigkill_during_the_gate_then_no_ack_rolls_back(box: Box, system: LocalSystem, ipks: Ipks) -> None:
    """Killed while it waits for its end-to-end ack; started again it connects but the cloud never acks (a
    release that never gets an end-to-end ack): the watchdog reinstalls v1, which reports why."""
    v1, _, v2, _ = ipks
    cmd_id = first_update(box, system, ipks)
    assert box.exited() == 0, box.log()[-3000:]
    deadline = int(marker(box)["DEADLINE"])  # type: ignore[index]
    cloud_down(system)
    try:
        box.start()  # connected to the broker, waiting in its gate
        sigkill(box)
        assert marker(box) is not None
        box.start()
        gate = box.state / UPDATE_DIR / GATE_FILE
        assert system.wait_for(gate.exists, int(GATE_S) + 30), box.log()[-3000:]
        assert read_marker(gate) == {"TO": v2.ipk_version, "GATE": "no_ack"}
        assert box.proc is not None and box.proc.poll() is None  # it keeps running: the watchdog decides
        out = box.root.watchdog(box.state, now=deadline)  # cron's next run
        assert out.returncode == 0, out.stderr
        assert box.root.running == v1.ipk_version
        stop_process(box.proc)  # the watchdog's restart
    finally:
        cloud_up(system)
    box.start()
    _, _, _, data = settled(box, cmd_id, ("failed", "rolled_back"), v1.ipk_version)
    assert data == {"from": v1.ipk_version, "to": v2.ipk_version, "reason": "gate_timeout", "gate": "no_ack"}
    assert box.health_shows(agent_version=v1.ipk_version, update_outcome="rolled_back")


def test_a_release_that_starts_but_cannot_connect_is_rolled_back(box: Box, system: LocalSystem, ipks: Ipks) -> None:
    """The new version runs (buffer open, meter read) but its configuration points at an endpoint nothing
    answers: the gate times out, the watchdog reinstalls v1, and v1 reports it with what v2 saw."""
    v1, _, v2, _ = ipks
    cmd_id = first_update(box, system, ipks)
    assert box.exited() == 0, box.log()[-3000:]
    deadline = int(marker(box)["DEADLINE"])  # type: ignore[index]
    box.write_config(endpoint=f"mqtts://127.0.0.1:{closed_port()}")
    box.start(connected=False)
    gate = box.state / UPDATE_DIR / GATE_FILE
    assert system.wait_for(gate.exists, int(GATE_S) + 30), box.log()[-3000:]
    assert read_marker(gate) == {"TO": v2.ipk_version, "GATE": "no_connection"}
    assert time.time() >= deadline
    out = box.root.watchdog(box.state, now=deadline)
    assert out.returncode == 0, out.stderr
    assert box.root.running == v1.ipk_version
    assert box.proc is not None
    stop_process(box.proc)  # the watchdog's restart, with v1's (working) configuration
    box.write_config()
    box.start()
    _, _, _, data = settled(box, cmd_id, ("failed", "rolled_back"), v1.ipk_version)
    assert data == {"from": v1.ipk_version, "to": v2.ipk_version, "reason": "gate_timeout", "gate": "no_connection"}
    sample = box.health_shows(agent_version=v1.ipk_version, update_outcome="rolled_back")
    assert sample["health:update_to"] == v2.ipk_version and sample["health:update_reason"] == "gate_timeout"


def test_an_install_cut_off_with_the_agent_is_rolled_back(
    box: Box, system: LocalSystem, ipks: Ipks, tmp_path: Path
) -> None:
    """A power loss during the install: the agent and the package manager die together. The next start
    cannot trust the files on disk whatever the database says; it hands the marker to the watchdog, which
    reinstalls v1 at its next run, and the start after that reports it."""
    v1, _, v2, _ = ipks
    flag = tmp_path / "installer.pid"
    slow_installer(box, tmp_path, f"echo $$ > {flag}; sleep 30")
    cmd_id = first_update(box, system, ipks)
    assert system.wait_for(lambda: flag.exists() and flag.read_text().strip() != "", 90, poll=0.01)
    os.killpg(int(flag.read_text()), signal.SIGKILL)  # the installer's own session
    sigkill(box)
    assert marker(box) is not None
    box.start()
    rollback = box.state / UPDATE_DIR / "rollback"
    assert system.wait_for(rollback.exists, 30), box.log()[-3000:]
    assert read_marker(rollback)["REASON"] == "install_interrupted"  # type: ignore[index]
    out = box.root.watchdog(box.state, now=0)  # cron's next run: a claim is acted on whatever the time
    assert out.returncode == 0, out.stderr
    assert box.root.running == v1.ipk_version
    assert box.proc is not None
    stop_process(box.proc)  # the watchdog's restart
    box.start()
    _, _, _, data = settled(box, cmd_id, ("failed", "rolled_back"), v1.ipk_version)
    assert data == {"from": v1.ipk_version, "to": v2.ipk_version, "reason": "install_interrupted"}
