"""Install a verified package with the box's package manager, keep the rollback target, and leave the
pending marker the independent watchdog (openwrt/files/glucoagent.update-watchdog) acts on.

The marker and the report are ``KEY=value`` lines, so the watchdog, a shell script, reads them without
any of the new agent's Python code: a release that cannot even start Python is still rolled back.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path

from agent.fsutil import atomic_write, fsync_dir
from agent.update.pkgdb import (
    PackageManager,
    installed_version,
    read_marker,
    write_marker,
)
from agent.update.staging import UPDATE_DIR, UpdateFailed
from agent.wire.release import NAME_RE, VERSION_RE, Manifest

log = logging.getLogger(__name__)

KEPT_DIR = "kept"  # package files of installed versions: the rollback targets
PENDING_FILE = "pending"  # an install awaiting its health gate (the watchdog's input)
ROLLBACK_FILE = "rollback"  # the marker, claimed by the watchdog (a rename: it or the gate, never both)
REPORT_FILE = "report"  # the watchdog's outcome, reported by the next agent start
INSTALL_LOCK = "install.lock"  # held by the package manager run while it installs (flock)
INSTALL_LOG = "install.log"  # its output, the last lines go into an install_failed result
INSTALL_TIMEOUT_S = 300.0


def kept_name(m: Manifest) -> str:
    return f"{m.name}_{m.version}.{m.format}"


def keep(state_dir: Path, package: Path, m: Manifest) -> Path:
    """Keep the package file of ``m`` as a rollback target (a copy, fsynced). Returns its path."""
    target = state_dir / UPDATE_DIR / KEPT_DIR / kept_name(m)
    atomic_write(target, package.read_bytes())
    return target


def prune_kept(state_dir: Path, keep_names: set[str]) -> None:
    """Flash is bounded: only the running version's file and the rollback target stay."""
    for path in (state_dir / UPDATE_DIR / KEPT_DIR).glob("*"):
        if path.name not in keep_names:
            path.unlink(missing_ok=True)


def install(
    state_dir: Path, pm: PackageManager, package: Path, m: Manifest, *, running: str, previous: Path, gate_s: float
) -> None:
    """Pending marker first (the watchdog then rolls back whatever happens next), then the package manager.
    Raises UpdateFailed(install_failed) when the package manager refuses; the marker is then removed, since
    the package database still holds the running version."""
    if not (NAME_RE.match(m.name) and VERSION_RE.match(running) and previous.is_file()):
        raise UpdateFailed("no_rollback_target", f"no kept package file of the running {running} to roll back to")
    directory = state_dir / UPDATE_DIR
    (directory / REPORT_FILE).unlink(missing_ok=True)  # a rollback reported long ago must not answer this one
    write_marker(
        directory / PENDING_FILE,
        {
            "NAME": m.name,
            "FROM": running,
            "TO": m.version,
            "PREVIOUS": str(previous),
            "DEADLINE": str(int(time.time() + gate_s)),
        },
    )
    argv = [*pm.install, str(package)]
    log.warning("update: installing %s %s over %s: %s", m.name, m.version, running, shlex.join(argv))
    rc, detail = _run_installer(directory, argv)
    now = installed_version(pm.status_file, m.name)
    if rc == "0" and now == m.version:
        return
    if rc == "timeout":  # killed mid-way: files of either version may be on disk, whatever the database says
        if hand_to_watchdog(state_dir, "install_timeout"):
            log.error("update: %s cut off after %.0fs; the watchdog reinstalls %s", m.name, INSTALL_TIMEOUT_S, running)
    elif now == running:  # refused, nothing changed: no gate to wait for
        (directory / PENDING_FILE).unlink(missing_ok=True)
    raise UpdateFailed("install_failed", f"package manager exit {rc}, {m.name} now at {now}: {detail}")


def _run_installer(directory: Path, argv: list[str]) -> tuple[str, str]:
    """Run the package manager so that stopping or killing this agent cannot cut it off.

    On a box the package manager stops the very agent that runs it: opkg's prerm runs
    ``/etc/init.d/glucoagent stop`` (procd: SIGTERM, SIGKILL after term_timeout), apk's post-upgrade
    restarts it. So the installer runs in its own session (no signal to the agent's process group reaches
    it), with its output in ``install.log`` rather than a pipe (a pipe whose reader died kills the writer
    with SIGPIPE half-way through an install), and holds ``install.lock`` (an flock on an inherited file
    descriptor) until it exits: the next agent start, which procd may begin while the package manager is
    still writing its database, waits on that lock before it reads which version is installed."""
    lock_fd = os.open(directory / INSTALL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        with (directory / INSTALL_LOG).open("wb") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, pass_fds=(lock_fd,),
                )  # fmt: skip
            except OSError as exc:
                return "error", str(exc)
        try:
            rc = str(proc.wait(timeout=INSTALL_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
    finally:
        os.close(lock_fd)
    try:
        detail = (directory / INSTALL_LOG).read_bytes()[-300:].decode("utf-8", "replace").strip()
    except OSError:
        detail = ""
    return rc, detail


def wait_for_installer(state_dir: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> bool:
    """Wait until no package manager started by an update runs any more (its ``install.lock``); True when
    none does, False when one still held it after ``timeout_s``."""
    path = state_dir / UPDATE_DIR / INSTALL_LOCK
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        deadline = time.monotonic() + timeout_s
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                if not logged:
                    log.warning("update: the package manager is still installing; waiting for it")
                    logged = True
                time.sleep(0.2)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
    finally:
        os.close(fd)


def gate_passed(state_dir: Path, running: str) -> bool:
    """The new version passed its health gate: claim the marker before the watchdog does.

    Both claim it by renaming the one file, so exactly one wins: True here means no rollback will
    happen; False means there was no pending update of ``running``, or the watchdog took it first."""
    directory = state_dir / UPDATE_DIR
    pending = read_marker(directory / PENDING_FILE)
    if pending is None or pending.get("TO") != running:
        return False
    claimed = directory / f".{PENDING_FILE}.passed"
    try:
        os.rename(directory / PENDING_FILE, claimed)
    except FileNotFoundError:
        return False
    claimed.unlink()
    fsync_dir(directory)
    return True


def installer_started(state_dir: Path) -> bool:
    """The pending update's package manager was started (its log opened after the marker was written): a run
    cut off by a power loss may have left files of either version, whatever the database says."""
    directory = state_dir / UPDATE_DIR
    try:
        return (directory / INSTALL_LOG).stat().st_mtime_ns >= (directory / PENDING_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return False


def hand_to_watchdog(state_dir: Path, reason: str) -> bool:
    """Claim the pending marker for the watchdog's rollback (its ``rollback`` file, with ``REASON``): its next
    run reinstalls the previous package whatever the deadline. False when the watchdog took it first."""
    directory = state_dir / UPDATE_DIR
    claimed = directory / f".{PENDING_FILE}.handed"
    try:
        os.rename(directory / PENDING_FILE, claimed)
    except FileNotFoundError:
        return False
    fields = read_marker(claimed)
    if fields is None:  # the watchdog finished this handover itself (it takes a leftover aside copy)
        return True
    write_marker(directory / ROLLBACK_FILE, {**fields, "REASON": reason})
    claimed.unlink(missing_ok=True)
    fsync_dir(directory)
    return True


def take_report(state_dir: Path) -> dict[str, str] | None:
    """The watchdog's report of a rollback, once: for the next start's signed result."""
    path = state_dir / UPDATE_DIR / REPORT_FILE
    report = read_marker(path)
    if report is not None:
        path.unlink(missing_ok=True)
    return report
