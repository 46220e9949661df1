"""The CRL is read, changed and rewritten by two parties: ``serve``'s CRL keeper (re-issue) and
``glucoagent-backend revoke`` (add a serial), often in two processes. No revocation may be lost."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import time
from pathlib import Path

from backend.pki import FleetPki

REVOCATIONS = 100


def _reissue_until(directory: str, stop_file: str) -> None:
    pki = FleetPki.load(Path(directory))
    Path(stop_file).with_suffix(".ready").touch()
    while not Path(stop_file).exists():
        pki.refresh_crl_if_due(max_age=dt.timedelta(seconds=-1))  # always due: re-issue as fast as it can


def test_revocations_survive_a_concurrent_reissue_in_another_process(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    FleetPki.create(directory)
    stop = tmp_path / "stop"
    keeper = multiprocessing.get_context("spawn").Process(target=_reissue_until, args=(str(directory), str(stop)))
    keeper.start()
    try:
        pki = FleetPki.load(directory)
        deadline = time.monotonic() + 30
        while not stop.with_suffix(".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        for serial in range(1000, 1000 + REVOCATIONS):
            pki.revoke(serial)
    finally:
        stop.touch()
        keeper.join(timeout=30)
    assert keeper.exitcode == 0
    assert set(range(1000, 1000 + REVOCATIONS)) <= FleetPki.load(directory).revoked_serials()
    assert not list(directory.glob(".*.tmp")), "a temp file was left behind"
