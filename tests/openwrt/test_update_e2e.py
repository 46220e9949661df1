"""Issue 16 end to end: the real agent, broker (TLS, ACLs) and cloud, OpenWrt's real opkg in an offline root
standing for the box's package database. The cloud signs releases, sends ``update``; the agent downloads in
chunks, installs, stops (the test plays procd and starts it again), and the next start runs the health gate
or reports the watchdog's rollback. The version "running" is the one opkg records in the root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.update_rig import BACKEND, Box, Ipks, SlowShelf, make_box, release, two_versions

from agent.update.install import KEPT_DIR, PENDING_FILE
from agent.update.pkgdb import read_marker
from agent.update.staging import PROGRESS_FILE, UPDATE_DIR
from openwrt import hosttools
from testbed.harness import LocalSystem, stop_process


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("upde2e")) as s:
        yield s


@pytest.fixture(scope="module")
def ipks(tmp_path_factory: pytest.TempPathFactory) -> Ipks:
    return two_versions(tmp_path_factory.mktemp("e2e-ipks"))


@pytest.fixture
def box(system: LocalSystem, openwrt_tools: hosttools.Tools, ipks: Ipks, tmp_path: Path) -> Iterator[Box]:
    b = make_box(system, openwrt_tools, ipks, tmp_path)
    yield b
    if b.proc is not None:
        stop_process(b.proc)


def test_good_update_then_replay_downgrade_and_recall(box: Box, system: LocalSystem, ipks: Ipks) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    m1, m2 = release(system, v1_ipk), release(system, v2_ipk, "--min-from", v1.ipk_version)
    box.start()
    cmd_id, envelope = box.send({"manifest": m2, "previous": m1})  # first update: the box fetches v1's file too
    assert box.exited() == 0, box.log()
    assert box.root.running == v2.ipk_version
    marker = read_marker(box.state / UPDATE_DIR / PENDING_FILE)
    assert marker is not None and marker["TO"] == v2.ipk_version

    box.start()  # procd starts the new version: it must get an end-to-end ack within the gate
    status, code, _msg, data = box.result(cmd_id)
    assert (status, code) == ("ok", "updated"), box.log()
    assert data == {"from": v1.ipk_version, "to": v2.ipk_version}
    assert not (box.state / UPDATE_DIR / PENDING_FILE).exists()
    kept = sorted(p.name for p in (box.state / UPDATE_DIR / KEPT_DIR).iterdir())
    assert kept == [f"glucoagent_{v1.ipk_version}.ipk", f"glucoagent_{v2.ipk_version}.ipk"]
    # The cloud sees the version now running and the outcome, in the health samples and the devices listing.
    sample = box.health_shows(agent_version=v2.ipk_version, update_outcome="kept")
    assert (sample["health:update_from"], sample["health:update_to"]) == (v1.ipk_version, v2.ipk_version)
    assert sample["health:update_reason"] == "updated" and sample["health:update_at"] > 0
    listed = box.listed()
    assert listed["version"] == v2.ipk_version and listed["status"] == "online"
    assert listed["update"]["outcome"] == "kept" and listed["update"]["to"] == v2.ipk_version
    text = subprocess.run([BACKEND, "devices", "--home", str(system.home.root)], capture_output=True, text=True,
                          timeout=60, check=True).stdout  # fmt: skip
    line = next(x for x in text.splitlines() if x.startswith(box.device_id))
    assert f"online  version {v2.ipk_version}  last update: kept {v1.ipk_version} -> {v2.ipk_version} (updated)" in line

    # The same envelope again: the journal answers with the stored result, nothing runs.
    system.service.publish(f"gluco/v1/dev/{box.device_id}/commands", envelope)  # type: ignore[union-attr]
    # An old release under a new id: the version order refuses it (no downgrade allowed).
    old_id, _ = box.send({"manifest": m1})
    assert box.result(old_id)[:2] == ("refused", "downgrade")
    again_id, _ = box.send({"manifest": m2})
    assert box.result(again_id)[:2] == ("refused", "same_version")
    assert box.root.running == v2.ipk_version
    refused = box.health_shows(agent_version=v2.ipk_version, update_outcome="refused")
    assert (refused["health:update_to"], refused["health:update_reason"]) == (v2.ipk_version, "same_version")
    assert "replayed: not executed again" in box.log()

    # Recall: the same earlier package, re-signed with the downgrade allowed.
    recall = release(system, v1_ipk, "--allow-downgrade")
    recall_id, _ = box.send({"manifest": recall})
    assert box.exited() == 0, box.log()
    assert box.root.running == v1.ipk_version
    box.start()
    assert box.result(recall_id)[:2] == ("ok", "updated"), box.log()


def test_a_new_version_that_never_starts_is_rolled_back_and_reported(box: Box, system: LocalSystem, ipks: Ipks) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    m1, m2 = release(system, v1_ipk), release(system, v2_ipk)
    box.attach_meter(20)
    box.start()
    assert system.wait_for(lambda: len(box.readings()) >= 5, 60), box.log()[-3000:]
    cmd_id, _ = box.send({"manifest": m2, "previous": m1})
    assert box.exited() == 0, box.log()
    assert box.root.running == v2.ipk_version
    deadline = int(read_marker(box.state / UPDATE_DIR / PENDING_FILE)["DEADLINE"])  # type: ignore[index]

    # The new version crashes at start (here: it is never started); the watchdog acts after the deadline.
    out = box.root.watchdog(box.state, now=deadline)
    assert out.returncode == 0, out.stderr
    assert box.root.running == v1.ipk_version

    box.start()  # the previous version again: it reports the rollback as the update's signed result
    status, code, _msg, data = box.result(cmd_id)
    assert (status, code) == ("failed", "rolled_back"), box.log()
    assert data == {"from": v1.ipk_version, "to": v2.ipk_version, "reason": "gate_timeout"}
    sample = box.health_shows(agent_version=v1.ipk_version, update_outcome="rolled_back")
    assert (sample["health:update_to"], sample["health:update_reason"]) == (v2.ipk_version, "gate_timeout")
    assert box.listed()["update"]["outcome"] == "rolled_back"

    # The buffer across three starts, an install and a rollback: every reading once, the stream gap-free.
    assert system.wait_for(lambda: len(box.readings()) >= 20, 60), box.log()[-3000:]
    keys = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"], r.fields["glu:meal"]) for r in box.readings()]
    assert len(box.readings()) == 20 and len(set(keys)) == 20
    clinical = sorted(r.seq for r in system.db.records(device_id=box.device_id) if r.stream == "c")
    assert clinical == list(range(1, len(clinical) + 1))


def test_bad_signature_and_no_rollback_target_change_nothing(box: Box, system: LocalSystem, ipks: Ipks) -> None:
    v1, _, _, v2_ipk = ipks
    m2 = release(system, v2_ipk)
    forged = m2[:-1] + bytes([m2[-1] ^ 1])
    box.start()
    bad_id, _ = box.send({"manifest": forged})
    assert box.result(bad_id)[:2] == ("refused", "bad_signature")
    no_prev, _ = box.send({"manifest": m2})  # first update without the running version's manifest
    assert box.result(no_prev)[:2] == ("refused", "no_rollback_target")
    assert box.root.running == v1.ipk_version
    assert box.proc is not None and box.proc.poll() is None  # still running


def test_sigkill_during_download_is_reported_and_the_download_resumes(
    box: Box, system: LocalSystem, ipks: Ipks
) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    m1, m2 = release(system, v1_ipk), release(system, v2_ipk)
    assert system.service is not None
    real_shelf = system.service.releases
    system.service.releases = SlowShelf(system.home.releases.dir)
    try:
        box.start()
        cmd_id, _ = box.send({"manifest": m2, "previous": m1})
        progress = box.state / UPDATE_DIR / PROGRESS_FILE

        def midway() -> bool:
            return progress.exists() and json.loads(progress.read_text())["next"] > 0

        assert system.wait_for(midway, 60, poll=0.02), box.log()[-3000:]
        assert box.proc is not None
        os.killpg(box.proc.pid, signal.SIGKILL)
        box.proc.wait(timeout=10)
        stopped_at = json.loads(progress.read_text())["next"]
        assert box.root.running == v1.ipk_version  # nothing installed

        box.start()  # the update was cut off while downloading: reported, nothing changed
        assert box.result(cmd_id)[:2] == ("failed", "interrupted"), box.log()[-3000:]
        again_id, _ = box.send({"manifest": m2, "previous": m1})
        assert box.exited() == 0, box.log()[-3000:]
    finally:
        system.service.releases = real_shelf
    assert "update: resuming" in box.log()  # from the recorded offset, not from byte 0
    assert stopped_at > 0
    assert box.root.running == v2.ipk_version
    box.start()
    assert box.result(again_id)[:2] == ("ok", "updated"), box.log()[-3000:]
