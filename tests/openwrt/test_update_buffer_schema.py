"""Issue 16: the buffer survives a rollback across a schema change. The new release's code (this tree's
agent with one additive buffer migration more, run from its own copy) migrates the buffer, reads a meter and
stores its readings while the cloud cannot acknowledge them, and never passes its gate; the watchdog
reinstalls v1 (this tree), which opens the newer buffer as it is and uploads every reading exactly once."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.update_rig import Box, Ipks, make_box, newer_agent_tree, release, start_from, two_versions

from agent.buffer.schema import SCHEMA_VERSION
from agent.update.install import PENDING_FILE
from agent.update.pkgdb import read_marker
from agent.update.staging import UPDATE_DIR
from openwrt import hosttools
from testbed.harness import LocalSystem, stop_process

READINGS = 15
MIGRATION = ("ALTER TABLE outbox ADD COLUMN origin TEXT", "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("updschema")) as s:
        yield s


@pytest.fixture
def ipks(tmp_path: Path) -> Ipks:
    return two_versions(tmp_path / "ipks")


@pytest.fixture
def box(system: LocalSystem, openwrt_tools: hosttools.Tools, ipks: Ipks, tmp_path: Path) -> Iterator[Box]:
    b = make_box(system, openwrt_tools, ipks, tmp_path / "box")
    yield b
    if b.proc is not None:
        stop_process(b.proc)
    if system.service is None:
        system.start_backend()


def test_readings_stored_by_a_migrated_release_are_uploaded_once_after_its_rollback(
    box: Box, system: LocalSystem, ipks: Ipks, tmp_path: Path
) -> None:
    v1, v1_ipk, v2, v2_ipk = ipks
    newer = newer_agent_tree(tmp_path, MIGRATION, oldest_reader=SCHEMA_VERSION)
    box.start()
    cmd_id, _ = box.send({"manifest": release(system, v2_ipk), "previous": release(system, v1_ipk)})
    assert box.exited() == 0, box.log()[-3000:]
    assert box.root.running == v2.ipk_version
    deadline = int(read_marker(box.state / UPDATE_DIR / PENDING_FILE)["DEADLINE"])  # type: ignore[index]

    system.stop_backend()  # the broker answers, nothing acknowledges: the readings stay in the buffer
    system.service = None
    box.attach_meter(READINGS)
    proc = start_from(box, newer)
    status = box.state / "run" / "status.json"

    def stored_all() -> bool:
        try:
            snap = json.loads(status.read_text())
        except (OSError, ValueError):
            return False
        return bool(snap.get("pid") == proc.pid and snap.get("buffer_depth", 0) >= READINGS)

    assert system.wait_for(stored_all, 60), box.log()[-3000:]
    assert f"buffer schema migrated to version {SCHEMA_VERSION + 1}" in box.log()
    stop_process(proc)  # it would fail its gate; the watchdog decides either way
    assert box.root.watchdog(box.state, now=deadline).returncode == 0
    assert box.root.running == v1.ipk_version

    system.start_backend()
    box.start()  # v1's code again, on the buffer v2 migrated
    assert box.result(cmd_id)[:2] == ("failed", "rolled_back"), box.log()[-3000:]
    box.audit(READINGS)
    assert box.results_made(cmd_id) == 1
    assert f"buffer schema {SCHEMA_VERSION + 1} from a newer agent" in box.log()
    stop_process(box.proc)  # type: ignore[arg-type]
    db = sqlite3.connect(box.state / "buffer.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("SELECT count(*) FROM outbox WHERE acked_at IS NULL AND stream = 'c'").fetchone()[0] == 0
    finally:
        db.close()
