"""Issue 16, step 3 on OpenWrt's real opkg in an offline root: the installer (agent/update/install.py) and
the independent shell watchdog (openwrt/files/glucoagent.update-watchdog) that rolls back an update whose
health gate did not pass in time. The version "running" is the one opkg's database records in the root."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.opkg_root import NAME, OpkgRoot, opkg_root

from agent.update.install import INSTALL_LOCK, PENDING_FILE, ROLLBACK_FILE, gate_passed, install, keep, take_report
from agent.update.pkgdb import PackageManager, read_marker
from agent.update.staging import UPDATE_DIR, UpdateFailed
from agent.wire.release import Manifest
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import Package, describe


@pytest.fixture(scope="module")
def ipks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Package, Path, Package, Path]:
    v1 = describe()
    v2 = dataclasses.replace(v1, release=v1.release + 1)
    out = tmp_path_factory.mktemp("upd-ipks")
    return v1, B.write_ipk(v1, out / "1"), v2, B.write_ipk(v2, out / "2")


def manifest(pkg: Package, path: Path) -> Manifest:
    data = path.read_bytes()
    return Manifest(NAME, pkg.ipk_version, "ipk", len(data), hashlib.sha256(data).digest(), "0", False, 1)


@dataclasses.dataclass
class Box:
    root: OpkgRoot
    state: Path

    @property
    def pm(self) -> PackageManager:
        return self.root.pm

    @property
    def running(self) -> str | None:
        return self.root.running

    def watchdog(self, now: int) -> subprocess.CompletedProcess[str]:
        return self.root.watchdog(self.state, now)


@pytest.fixture
def box(openwrt_tools: hosttools.Tools, ipks: tuple[Package, Path, Package, Path], tmp_path: Path) -> Box:
    """A root with release 1 installed by the real opkg, and its package file kept (the rollback target)."""
    v1, v1_ipk, _, _ = ipks
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return Box(opkg_root(openwrt_tools, tmp_path, v1, v1_ipk), state)


def test_good_update_passes_its_gate_and_the_watchdog_leaves_it(
    box: Box, ipks: tuple[Package, Path, Package, Path]
) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version, previous=previous, gate_s=60)
    assert box.running == v2.ipk_version
    marker = read_marker(box.state / UPDATE_DIR / PENDING_FILE)
    assert marker is not None and (marker["FROM"], marker["TO"]) == (v1.ipk_version, v2.ipk_version)

    assert gate_passed(box.state, v2.ipk_version)  # the new version: started, connected, got its ack
    out = box.watchdog(now=2**40)  # long after the deadline: nothing pending any more
    assert out.returncode == 0, out.stderr
    assert box.running == v2.ipk_version
    assert take_report(box.state) is None


def test_gate_not_passed_in_time_rolls_back_to_the_kept_package(
    box: Box, ipks: tuple[Package, Path, Package, Path]
) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version, previous=previous, gate_s=60)
    deadline = int(read_marker(box.state / UPDATE_DIR / PENDING_FILE)["DEADLINE"])  # type: ignore[index]

    early = box.watchdog(now=deadline - 1)  # still within the gate: the new version keeps its chance
    assert early.returncode == 0 and early.stderr == ""
    assert box.running == v2.ipk_version

    late = box.watchdog(now=deadline)  # the new version never claimed the marker (crashed, no link, no ack)
    assert late.returncode == 0, late.stderr
    assert box.running == v1.ipk_version
    assert "did not pass its health gate" in late.stderr
    assert not gate_passed(box.state, v2.ipk_version)  # too late: the watchdog took the marker
    report = take_report(box.state)
    assert report is not None
    assert {k: report[k] for k in ("OUTCOME", "NAME", "FROM", "TO", "REASON")} == {
        "OUTCOME": "rolled_back", "NAME": NAME, "FROM": v1.ipk_version, "TO": v2.ipk_version, "REASON": "gate_timeout"
    }  # fmt: skip
    assert take_report(box.state) is None  # reported once
    again = box.watchdog(now=deadline + 60)
    assert again.returncode == 0 and box.running == v1.ipk_version


def test_watchdog_waits_while_the_package_manager_still_installs(
    box: Box, ipks: tuple[Package, Path, Package, Path]
) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version, previous=previous, gate_s=0)
    lock = os.open(box.state / UPDATE_DIR / INSTALL_LOCK, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the package manager run holds it until it exits
        busy = box.watchdog(now=2**40)
        assert busy.returncode == 0, busy.stderr
        assert box.running == v2.ipk_version and (box.state / UPDATE_DIR / PENDING_FILE).exists()
    finally:
        os.close(lock)
    done = box.watchdog(now=2**40)
    assert done.returncode == 0, done.stderr
    assert box.running == v1.ipk_version


def busybox_path(tmp_path: Path, tools_bin: str) -> str:
    """A PATH of BusyBox's applets without flock (an OpenWrt image built without it), the host tools first."""
    applets = tmp_path / "applets"
    applets.mkdir()
    busybox = shutil.which("busybox")
    assert busybox, "busybox is missing: make setup installs it"
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if name != "flock":
            (applets / name).symlink_to(busybox)
    return f"{tools_bin}:{applets}"


def test_watchdog_without_flock_still_waits_for_the_package_manager(
    box: Box, ipks: tuple[Package, Path, Package, Path], tmp_path: Path
) -> None:
    # BUSYBOX_DEFAULT_FLOCK is y on OpenWrt, but an image may leave it out: the watchdog must still never
    # reinstall while the package manager the agent started runs (it holds install.lock open until it exits)
    v1, v1_ipk, v2, v2_ipk = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version, previous=previous, gate_s=0)
    tools_bin = box.root.env["PATH"].split(":")[0]
    bare = dataclasses.replace(box.root, env={**box.root.env, "PATH": busybox_path(tmp_path, tools_bin)})
    lock = os.open(box.state / UPDATE_DIR / INSTALL_LOCK, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    holder = subprocess.Popen(["sleep", "120"], pass_fds=(lock,))  # as the package manager run holds it
    os.close(lock)
    try:
        busy = bare.watchdog(box.state, 2**40)
        assert busy.returncode == 0, busy.stderr
        assert box.running == v2.ipk_version and (box.state / UPDATE_DIR / PENDING_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    done = bare.watchdog(box.state, 2**40)
    assert done.returncode == 0, done.stderr
    assert box.running == v1.ipk_version


def test_watchdog_killed_mid_rollback_finishes_it_next_run(box: Box, ipks: tuple[Package, Path, Package, Path]) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version, previous=previous, gate_s=0)
    update = box.state / UPDATE_DIR
    (update / PENDING_FILE).rename(update / ROLLBACK_FILE)  # claimed, then killed before reinstalling
    assert box.running == v2.ipk_version
    out = box.watchdog(now=0)  # the claim is honoured whatever the time
    assert out.returncode == 0, out.stderr
    assert box.running == v1.ipk_version
    assert (take_report(box.state) or {}).get("OUTCOME") == "rolled_back"


def test_a_handover_cut_by_a_power_loss_is_finished_by_the_watchdog(
    box: Box, ipks: tuple[Package, Path, Package, Path]
) -> None:
    """hand_to_watchdog renames pending aside, then writes rollback: a power loss between the two leaves
    only the aside copy, which the watchdog takes as the agent's claim (whatever the deadline)."""
    v1, v1_ipk, v2, v2_ipk = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version, previous=previous, gate_s=600)
    update = box.state / UPDATE_DIR
    (update / PENDING_FILE).rename(update / f".{PENDING_FILE}.handed")  # the first step, then the power went
    out = box.watchdog(now=0)  # long before the deadline: a handover is acted on at once
    assert out.returncode == 0, out.stderr
    assert box.running == v1.ipk_version
    assert (take_report(box.state) or {}).get("OUTCOME") == "rolled_back"
    assert sorted(p.name for p in update.iterdir() if p.name.startswith((".", "pending", "rollback"))) == []


def test_a_package_opkg_refuses_changes_nothing(
    box: Box, ipks: tuple[Package, Path, Package, Path], tmp_path: Path
) -> None:
    v1, v1_ipk, v2, _ = ipks
    previous = keep(box.state, v1_ipk, manifest(v1, v1_ipk))
    broken = tmp_path / "glucoagent_broken.ipk"
    broken.write_bytes(b"\x1f\x8b not an ipk at all")
    m = dataclasses.replace(manifest(v2, broken), version=v2.ipk_version)
    with pytest.raises(UpdateFailed) as exc:
        install(box.state, box.pm, broken, m, running=v1.ipk_version, previous=previous, gate_s=60)
    assert exc.value.code == "install_failed"
    assert box.running == v1.ipk_version
    assert not (box.state / UPDATE_DIR / PENDING_FILE).exists()  # nothing to gate, nothing to roll back


def test_no_rollback_target_refuses_before_anything_changes(
    box: Box, ipks: tuple[Package, Path, Package, Path]
) -> None:
    v1, _, v2, v2_ipk = ipks
    with pytest.raises(UpdateFailed) as exc:
        install(box.state, box.pm, v2_ipk, manifest(v2, v2_ipk), running=v1.ipk_version,
                previous=box.state / "missing.ipk", gate_s=60)  # fmt: skip
    assert exc.value.code == "no_rollback_target"
    assert box.running == v1.ipk_version
