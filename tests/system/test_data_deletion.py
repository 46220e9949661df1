"""Cloud files owner-only, and data to deletion (issue 12, defect 4 and "data to deletion").

Real processes throughout: `glucoagent-backend serve/erase` and `glucoagent deprovision` as
subprocesses, the broker and backend of ``LocalSystem``, libfaketime to age the cloud's clock.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import fill_buffer
from support.lifecycle import BACKEND, device_id_of, signed, upload

from agent.identity.credentials import load_identity
from agent.wire import telemetry
from backend.db import BackendDb, patient_hmac
from backend.home import BackendHome
from testbed.harness import GLUCOAGENT, LocalSystem, spawn, stop_process

ERASED = "patient-erase-0001"
KEPT = "patient-keep-0002"
FAKETIME = shutil.which("faketime")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("deletion")) as s:
        yield s


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(predicate())  # type: ignore[operator]


def serve(home: Path, log: Path, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`glucoagent-backend serve` against a port where no broker listens: it opens its database and retries."""
    argv = [*prefix, BACKEND, "serve", "--home", str(home), "--host", "127.0.0.1", "--port", str(closed_port()), *extra]
    return spawn(argv, log, env={**os.environ})


# --- defect 4: the cloud's files ---------------------------------------------------------------------
def test_backend_home_and_database_are_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "backend.db").touch()
    (home / "backend.db").chmod(0o644)  # a database left by an earlier version, world-readable
    old = os.umask(0o022)  # the wide umask a service manager typically hands out
    try:
        proc = serve(home, tmp_path / "serve.log")
    finally:
        os.umask(old)
    try:
        assert wait_for(lambda: (home / "backend.db-wal").exists() and (home / "backend.db-shm").exists(), 20), (
            tmp_path / "serve.log"
        ).read_text()
        modes = {p.relative_to(home).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in home.rglob("*")}
    finally:
        stop_process(proc)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("backend.db", "backend.db-wal", "backend.db-shm", "command.key"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    # Everything else owner-only too, but public certificates and the CRL (behind the 0700 home anyway).
    wide = {n: oct(m) for n, m in modes.items() if m & 0o077 and not n.endswith((".crt", "crl.pem"))}
    assert wide == {}


def test_database_files_made_under_a_wide_umask_are_narrowed(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        db = BackendHome(tmp_path / "home").db()
        db.add_token("T", "p", 60)  # a write: the WAL and SHM exist now
    finally:
        os.umask(old)
    try:
        for name in ("backend.db", "backend.db-wal", "backend.db-shm"):
            assert stat.S_IMODE((tmp_path / "home" / name).stat().st_mode) == 0o600, name
    finally:
        db.close()


# --- erase -------------------------------------------------------------------------------------------
def every_value(db_path: Path) -> list[tuple[str, object]]:
    """(table, value) for every column of every row of every table, read by a fresh connection."""
    con = sqlite3.connect(db_path)
    try:
        out: list[tuple[str, object]] = []
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for row in con.execute(f'SELECT * FROM "{table}"'):
                out += [(table, v) for v in row]
        return out
    finally:
        con.close()


def mentions(value: object, needle: str) -> bool:
    if isinstance(value, bytes):
        return needle.encode() in value
    return needle in str(value)


def test_erase_removes_every_row_of_a_patient_and_keeps_an_audit_without_the_reference(system: LocalSystem) -> None:
    gone = system.device_dir("erased-box")
    gone_id = device_id_of(system.provision(gone, ERASED))
    kept = system.device_dir("kept-box")
    kept_id = device_id_of(system.provision(kept, KEPT))
    for state in (gone, kept):
        batch = [
            signed(state, 1),
            signed(state, 2, telemetry.Kind.DOSE),
            signed(state, 3, telemetry.Kind.ALERT),
            signed(state, 4, wall=float("inf")),
        ]  # the last one quarantined
        assert upload(system, state, batch)["c"] == [1, 2, 3, 4]
        assert upload(system, state, [signed(state, 1, telemetry.Kind.HEALTH)], leaf="health")["h"] == [1]
    system.token(ERASED)  # an unused token of the patient too
    db_path = system.home.root / "backend.db"
    assert any(mentions(v, gone_id) for _, v in every_value(db_path))

    out = subprocess.run(
        [BACKEND, "erase", "--home", str(system.home.root), "--patient", ERASED, "--operator", "dpo@clinic"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("erased: "), out.stdout
    leftovers = [(t, v) for t, v in every_value(db_path) if mentions(v, ERASED) or mentions(v, gone_id)]
    assert leftovers == []
    # The other patient keeps everything.
    assert [(r.stream, r.seq) for r in system.db.records(kept_id)] == [("c", 1), ("c", 2), ("c", 3), ("h", 1)]
    assert system.db.patient_of(kept_id) == KEPT
    # The audit: who, when, how many; the patient only as a keyed hash.
    rows = system.db.query("SELECT at, operator, patient_hmac, devices, rows, detail FROM erasures")
    assert len(rows) == 1
    at, operator, digest, devices, count, _detail = rows[0]
    assert operator == "dpo@clinic" and abs(at - time.time()) < 60 and devices == 1 and count >= 8
    assert digest == patient_hmac(system.home.audit_salt, ERASED)
    # Nothing readable is left in the files either: secure_delete zeroed the pages, the WAL was truncated.
    for f in system.home.root.glob("backend.db*"):
        assert ERASED.encode() not in f.read_bytes(), f.name
    # The erased box can no longer add anything: it has no binding.
    with pytest.raises(TimeoutError):
        upload(system, gone, [signed(gone, 5)], timeout=3)
    assert system.db.records(gone_id) == []


# --- retention ---------------------------------------------------------------------------------------
def test_the_running_service_enforces_the_retention_period(tmp_path: Path) -> None:
    assert FAKETIME, "libfaketime (faketime) is required: make setup installs it"
    root = tmp_path / "cloud"
    with LocalSystem(root) as system:
        state = system.device_dir("box")
        device_id_of(system.provision(state, KEPT))
        assert upload(system, state, [signed(state, n) for n in (1, 2, 3)])["c"] == [1, 2, 3]
    home = root / "backend"

    def stored() -> int:
        db = BackendDb(home / "backend.db")
        try:
            return int(db.query("SELECT count(*) FROM records")[0][0])
        finally:
            db.close()

    # Today: younger than 2 days, kept through several sweeps.
    proc = serve(home, tmp_path / "now.log", "--retention-days", "2", "--retention-interval", "0.2")
    try:
        time.sleep(2)
        assert proc.poll() is None
        assert stored() == 3
    finally:
        stop_process(proc)
    # Three days on by the cloud's clock: the sweep deletes them.
    proc = serve(
        home,
        tmp_path / "later.log",
        "--retention-days",
        "2",
        "--retention-interval",
        "0.2",
        prefix=(FAKETIME, "-f", "+3d"),
    )
    try:
        # the sweep logs right after its commit: wait for both before stopping serve
        assert wait_for(
            lambda: stored() == 0 and "retention 2d: deleted 3 records" in (tmp_path / "later.log").read_text(), 30
        ), (tmp_path / "later.log").read_text()
    finally:
        stop_process(proc)


# --- deprovision ---------------------------------------------------------------------------------------
def test_deprovision_leaves_no_key_or_reading_readable(system: LocalSystem, tmp_path: Path) -> None:
    state = system.device_dir("wiped-box")
    device_id_of(system.provision(state, KEPT))
    fill_buffer(state, 20)
    key_pem = (state / "device.key").read_bytes()
    key_der = load_identity(state).key.private_bytes_raw()  # type: ignore[union-attr]
    # Other names for the same bytes (a backup's hard link, an open descriptor): an unlink leaves them readable.
    tmp_path.joinpath("key-link").hardlink_to(state / "device.key")
    tmp_path.joinpath("buffer-link").hardlink_to(state / "buffer.db")
    held = os.open(state / "device.key", os.O_RDONLY)
    try:
        out = subprocess.run(
            [GLUCOAGENT, "--state-dir", str(state), "deprovision", "--force"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert os.pread(held, len(key_pem), 0) == bytes(len(key_pem))
    finally:
        os.close(held)
    assert sorted(p.name for p in state.iterdir()) == ["factory"]
    body = key_pem.split(b"\n")[1]
    for f in [*state.rglob("*"), tmp_path / "key-link"]:
        if f.is_file():
            data = f.read_bytes()
            assert body not in data and key_der not in data, f
    assert set(tmp_path.joinpath("key-link").read_bytes()) == {0}
    buffer = tmp_path.joinpath("buffer-link").read_bytes()
    assert len(buffer) > 4096 and set(buffer) == {0}


def test_stopping_serve_is_clean(tmp_path: Path) -> None:
    proc = serve(tmp_path / "home", tmp_path / "serve.log")
    assert wait_for(lambda: (tmp_path / "home" / "backend.db").exists(), 20)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
