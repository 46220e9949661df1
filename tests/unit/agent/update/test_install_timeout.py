"""An install the agent cuts off at INSTALL_TIMEOUT_S (agent/update/install.py): the package manager was killed
mid-way, so files of either version may be on disk whatever its database says; the watchdog must reinstall the
previous package, the marker must not simply be dropped."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.update import install as installer
from agent.update.pkgdb import PackageManager, read_marker
from agent.update.staging import UPDATE_DIR, UpdateFailed
from agent.wire.release import Manifest


def test_a_timed_out_install_is_handed_to_the_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status = tmp_path / "status"
    status.write_text("Package: glucoagent\nVersion: 1.0-1\n\n")  # the database still names the running version
    package = tmp_path / "glucoagent_1.0-2_all.ipk"
    package.write_bytes(b"new")
    m = Manifest("glucoagent", "1.0-2", "ipk", 3, hashlib.sha256(b"new").digest(), "0", False, 1)
    state = tmp_path / "state"
    previous = installer.keep(state, package, m)  # any kept file will do as the rollback target here
    pm = PackageManager(("sh", "-c", "sleep 30", "pm"), status)  # a package manager that hangs mid-install
    monkeypatch.setattr(installer, "INSTALL_TIMEOUT_S", 0.5)
    with pytest.raises(UpdateFailed, match="timeout"):
        installer.install(state, pm, package, m, running="1.0-1", previous=previous, gate_s=300)
    claimed = read_marker(state / UPDATE_DIR / installer.ROLLBACK_FILE)
    assert claimed is not None and claimed["REASON"] == "install_timeout" and claimed["TO"] == "1.0-2"
    assert read_marker(state / UPDATE_DIR / installer.PENDING_FILE) is None
