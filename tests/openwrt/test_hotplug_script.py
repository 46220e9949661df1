"""The shipped hotplug script (/etc/hotplug.d/tty/50-glucoagent), run for real: busybox ash, OpenWrt's
own ``uci`` reading the config, the uevent environment procd's hotplug-call gives (ACTION, DEVNAME,
SUBSYSTEM, DEVPATH), sourced in a subshell as hotplug-call does. No Python starts: the script leaves
the notice in run_dir (RAM) itself, and the agent reads it.

``uci`` on PATH is a two-line wrapper that points the real binary at the test's config directory
(``uci -c DIR``): on the box the script calls plain ``uci`` and reads /etc/config/glucoagent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.meters import HOTPLUG_DIR, hotplug_note, take_hotplug_notes
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from openwrt import hosttools
from testbed.harness import LocalSystem, device_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "openwrt" / "files" / "glucoagent.hotplug"
ASH = shutil.which("busybox")


def _box(tmp_path: Path, tools: hosttools.Tools, config_text: str) -> dict[str, str]:
    """A config directory with ``glucoagent`` in it and PATH whose ``uci`` reads that directory."""
    conf = tmp_path / "etc-config"
    conf.mkdir(exist_ok=True)
    (conf / "glucoagent").write_text(config_text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "uci"
    wrapper.write_text(f'#!/bin/sh\nexec {tools.uci} -c {conf} -t {tmp_path / "uci-save"} "$@"\n')
    wrapper.chmod(0o755)
    logger = bin_dir / "logger"  # OpenWrt's logger goes to logd; here: a file the test reads
    logger.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "syslog"}\n')
    logger.chmod(0o755)
    return {"PATH": f"{bin_dir}:{tools.env['PATH']}", "LD_LIBRARY_PATH": tools.env.get("LD_LIBRARY_PATH", "")}


def hotplug(env: dict[str, str], script: Path = SCRIPT, **uevent: str) -> subprocess.CompletedProcess[str]:
    """What procd's hotplug-call does: source the script in a subshell of busybox ash, uevent in the env."""
    assert ASH, "busybox is missing: make setup installs it"
    return subprocess.run(
        [ASH, "ash", "-c", f". {script}"], env={**env, **uevent}, capture_output=True, text=True, timeout=30, check=False
    )


def _config(run_dir: str = "", state_dir: str = "") -> str:
    lines = ["config agent 'agent'"]
    if state_dir:
        lines.append(f"\toption state_dir '{state_dir}'")
    lines.append(f"\toption run_dir '{run_dir}'")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("uevent", "notice"),
    [
        ({"ACTION": "add", "DEVNAME": "ttyUSB0", "SUBSYSTEM": "tty"}, ("ttyUSB0", "add\n")),
        ({"ACTION": "remove", "DEVNAME": "ttyACM1", "SUBSYSTEM": "tty"}, ("ttyACM1", "remove\n")),
        ({"ACTION": "add", "DEVNAME": "ttyS0", "SUBSYSTEM": "tty"}, None),  # the console, not a meter
        ({"ACTION": "bind", "DEVNAME": "ttyUSB0", "SUBSYSTEM": "tty"}, None),
        ({"ACTION": "add", "DEVNAME": "ttyUSB0", "SUBSYSTEM": "usb"}, None),
        ({"ACTION": "add", "DEVNAME": "ttyUSB0/../../x", "SUBSYSTEM": "tty"}, None),  # never a path
        ({"ACTION": "add", "DEVNAME": "ttyUSB0 x", "SUBSYSTEM": "tty"}, None),
    ],
)
def test_script_leaves_the_notice_in_run_dir(
    openwrt_tools: hosttools.Tools, tmp_path: Path, uevent: dict[str, str], notice: tuple[str, str] | None
) -> None:
    run_dir, state_dir = tmp_path / "var-run", tmp_path / "flash"
    env = _box(tmp_path, openwrt_tools, _config(str(run_dir), str(state_dir)))
    proc = hotplug(env, **uevent, DEVPATH="/devices/platform/usb/tty/x")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "hotplug" in p.as_posix())
    if notice is None:
        assert files == []
        return
    name, content = notice
    assert files == ["var-run/hotplug", f"var-run/hotplug/{name}"]  # nothing on flash, no temp file left
    assert (run_dir / HOTPLUG_DIR / name).read_text() == content
    assert not state_dir.exists()
    # the agent reads it, and the notice the CLI writes is the same file
    assert take_hotplug_notes(run_dir) == [(content.strip(), f"/dev/{name}")]
    made = hotplug_note(tmp_path / "cli", content.strip(), name)
    assert made.read_bytes() == content.encode()


def test_without_run_dir_the_script_uses_the_agents_default(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    """run_dir empty: <state_dir>/run, as Config.run_path says (the shipped config sets /var/run/glucoagent)."""
    env = _box(tmp_path, openwrt_tools, _config("", str(tmp_path / "state")))
    assert hotplug(env, ACTION="add", DEVNAME="ttyACM0", SUBSYSTEM="tty").returncode == 0
    assert take_hotplug_notes(tmp_path / "state" / "run") == [("add", "/dev/ttyACM0")]


def test_anonymous_agent_section_and_default_state_dir(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    """The agent accepts ``config agent`` without a name: so does the script (``@agent[0]``); and the
    script's fallback state directory is the agent's default."""
    from agent.config import AgentSection, load_config

    text = f"config agent\n\toption run_dir '{tmp_path / 'ram'}'\n"
    (tmp_path / "agent.uci").write_text(text)
    assert load_config(tmp_path / "agent.uci").run_path == tmp_path / "ram"
    env = _box(tmp_path, openwrt_tools, text)
    assert hotplug(env, ACTION="add", DEVNAME="ttyUSB1", SUBSYSTEM="tty").returncode == 0
    assert take_hotplug_notes(tmp_path / "ram") == [("add", "/dev/ttyUSB1")]
    assert f"|| echo {AgentSection().state_dir})/run" in SCRIPT.read_text()


def test_shipped_config_puts_notices_in_var_run(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    from agent.config import load_config

    shipped = (REPO / "openwrt" / "files" / "glucoagent.config").read_text()
    env = _box(tmp_path, openwrt_tools, shipped)
    proc = subprocess.run(["uci", "-q", "get", "glucoagent.@agent[0].run_dir"], env=env, capture_output=True, text=True, check=False)
    assert proc.stdout.strip() == "/var/run/glucoagent"
    assert load_config(REPO / "openwrt" / "files" / "glucoagent.config").run_path == Path("/var/run/glucoagent")


def test_a_notice_that_cannot_be_written_is_logged_not_fatal(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = _box(tmp_path, openwrt_tools, _config(str(blocker)))
    proc = hotplug(env, ACTION="add", DEVNAME="ttyUSB3", SUBSYSTEM="tty")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "could not leave the add notice for ttyUSB3" in (tmp_path / "syslog").read_text()


def test_later_event_replaces_earlier_and_order_is_kept(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = _box(tmp_path, openwrt_tools, _config(str(run_dir)))
    for action, dev in (("add", "ttyUSB0"), ("remove", "ttyUSB0"), ("add", "ttyACM0"), ("add", "ttyUSB0")):
        assert hotplug(env, ACTION=action, DEVNAME=dev, SUBSYSTEM="tty").returncode == 0
        os.utime(run_dir / HOTPLUG_DIR / dev)  # distinct mtimes even on a coarse clock
    notes = take_hotplug_notes(run_dir)
    assert sorted(notes) == [("add", "/dev/ttyACM0"), ("add", "/dev/ttyUSB0")]  # unplug + replug: one add
    assert take_hotplug_notes(run_dir) == []
    (run_dir / HOTPLUG_DIR / ".ttyUSB9.123").write_text("add")  # a temp file the script has not renamed yet
    assert take_hotplug_notes(run_dir) == []


def test_hotplugged_meter_is_read_through_the_shell_script(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    """End to end: the agent runs with no ports configured; the script announces the meter; it is read."""
    meter = random_records("contour-astm", 8, seed=47)
    records = tmp_path / "contour.json"
    records.write_text(dumps(meter))
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyHOT"
        system.start_simulator("contour-astm", link, records, "--baud", "0")
        name = f"ttyUSB{os.getpid()}"
        dev = Path("/dev") / name  # hotplug names devices under /dev, as the kernel does
        dev.symlink_to(os.path.realpath(link))
        try:
            state = system.device_dir()
            assert system.provision(state).returncode == 0
            run_dir = tmp_path / "ram"
            config = device_config(state / "glucoagent.uci", [], agent={"port_scan_s": "0.3", "run_dir": str(run_dir)})
            env = _box(tmp_path, openwrt_tools, config.read_text())
            legacy = state / HOTPLUG_DIR  # where earlier versions left notices, on flash
            legacy.mkdir()
            (legacy / "add-ttyUSB0").write_text("/dev/ttyUSB0\n")
            system.start_agent(state, config)
            log = state / "agent.log"
            assert hotplug(env, ACTION="add", DEVNAME=name, SUBSYSTEM="tty").returncode == 0
            assert system.wait_for(lambda: len(system.db.records(kind="reading")) >= 8, timeout=60), log.read_text()[-3000:]
            assert f"hotplug: /dev/{name} appeared" in log.read_text()
            assert not legacy.exists()  # nothing on flash: the old folder is cleared at start
            assert list((run_dir / HOTPLUG_DIR).iterdir()) == []  # taken
        finally:
            dev.unlink()
