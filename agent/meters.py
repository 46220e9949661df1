"""Watches serial ports and reads whatever meter or pen appears on them.

A port is read when it appears (noticed by an event where the platform has inotify: the device
node or symlink appearing in its directory, or the hotplug script's notice in
``<run_dir>/hotplug/``, see :func:`hotplug_note` and agent/devwatch.py; polled every ``port_scan_s``
where it has not), and again every ``reread_s`` while attached. A pen reader is asked for a pen every
``port_scan_s`` all the same: only the question tells whether a pen lies on it.
Reads are handed to the Recorder, which stores only records the ledger has
not seen. A failed or partial read is logged; what verified is kept, and the
next read fetches the rest (the meter still holds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.buffer.intake import Recorder
from agent.clock import Clock
from agent.config import Config, DevicePort
from agent.devwatch import DirWatch, watch_target
from agent.errors import BufferFull, GlucoagentError
from drivers.errors import DriverError, NoPen
from drivers.models import MeterRead
from drivers.reader import read_device
from drivers.registry import AUTO, is_pen

log = logging.getLogger(__name__)
HOTPLUG_DIR = "hotplug"
HOTPLUG_ACTIONS = ("add", "remove")
_HOTPLUG_NAME_RE = re.compile(r"[A-Za-z0-9_]+", re.ASCII)  # a kernel tty name: ttyUSB0, ttyACM1
PEN_SETTLE_S = 60.0  # a pen left on the reader is read again at most this often
SAFETY_RESCAN_S = 600.0  # with events: ports are still looked at this often, in case an event was lost


@dataclasses.dataclass(slots=True)
class PortState:
    port: DevicePort
    present: bool = False
    last_read: float = 0.0
    failures: int = 0
    pen_read: bool = False  # a pen was read and has not left the reader's field since
    serial_errors: int = 0
    node: tuple[int, int, int] | None = None  # what the path is now (see _node): another node = replugged


def hotplug_note(run_dir: Path, action: str, devname: str) -> Path:
    """Leave the notice the daemon picks up on its next scan (as the hotplug shell script does).

    Format, shared with ``openwrt/files/glucoagent.hotplug``: one file per device,
    ``<run_dir>/hotplug/<devname>`` (e.g. ``ttyUSB0``), holding the last action (``add`` or
    ``remove``) and a newline, written to a dot-file first and renamed, so the daemon never reads
    half a notice and a later event replaces an earlier one. ``run_dir`` is RAM (tmpfs) on the box:
    notices are rewritten on every plug and mean nothing after a reboot.
    """
    name = os.path.basename(devname)
    if action not in HOTPLUG_ACTIONS or not _HOTPLUG_NAME_RE.fullmatch(name):
        raise GlucoagentError(f"hotplug: bad event {action!r} {devname!r}")
    folder = run_dir / HOTPLUG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    note = folder / name
    tmp = folder / f".{name}.{os.getpid()}"
    tmp.write_text(f"{action}\n")
    os.replace(tmp, note)
    return note


def take_hotplug_notes(run_dir: Path) -> list[tuple[str, str]]:
    """(action, /dev/name) of every complete notice, oldest first; each is removed as it is read."""
    folder = run_dir / HOTPLUG_DIR
    try:
        entries = [e for e in os.scandir(folder) if _HOTPLUG_NAME_RE.fullmatch(e.name)]  # skips dot temp files
    except FileNotFoundError:
        return []
    events: list[tuple[float, str, str]] = []
    for entry in entries:
        taken = folder / f".taken-{entry.name}"
        try:
            # Claim it by renaming first: a notice the script renames into place after this is a new
            # file, read on the next scan, never deleted unread.
            os.rename(entry.path, taken)
            mtime = taken.stat().st_mtime
            action = taken.read_text().strip()
            taken.unlink()
        except OSError:
            continue
        if action in HOTPLUG_ACTIONS:
            events.append((mtime, action, f"/dev/{entry.name}"))
        else:
            log.warning("hotplug: ignoring notice %s with action %r", entry.path, action)
    return [(action, dev) for _, action, dev in sorted(events)]


def _node(port: str) -> tuple[int, int, int] | None:
    """What ``port`` is now, or None when nothing usable is there (a dangling symlink: None): the path's
    own inode, a symlink's change time (made again, it is another link even where the file system reuses
    the inode number), and the device it leads to. Never a device node's times: using a tty moves them."""
    try:
        own = os.lstat(port)
        dev = os.stat(port)
    except OSError:
        return None
    return own.st_ino, own.st_ctime_ns if stat.S_ISLNK(own.st_mode) else 0, dev.st_rdev


class MeterWatcher:
    def __init__(self, cfg: Config, recorder: Recorder, clock: Clock, on_stored: Callable[[], None]) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.clock = clock
        self.on_stored = on_stored
        self.ports = {p.port: PortState(p) for p in cfg.ports}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # stop, read_now: end the wait
        self.serial_errors = 0
        self.events = False  # ports are noticed by inotify events (else polled every port_scan_s)

    def stop(self) -> None:
        self._stop.set()
        self._poke()

    def read_now(self) -> None:
        """Read every attached device at once (the `read_now` command)."""
        for state in self.ports.values():
            state.last_read = 0.0
        self._poke()

    def nudge(self) -> None:
        """Look at the ports again now (a configuration change may have moved a deadline)."""
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        watch = DirWatch.open()
        try:
            while not self._stop.is_set():
                self._take_hotplug_notes()
                for state in list(self.ports.values()):
                    if self._stop.is_set():
                        break
                    self._scan(state)
                self.events, new = watch.watch(self._folders()) if watch is not None else (False, False)
                if new:
                    continue  # look once more: what was made before the new watch was set has no event
                self._wait(watch, self._next_due(time.monotonic()))
        finally:
            # The wake-up pipe stays open with the watcher: a stop() or read_now() after this must never
            # write into a descriptor number the process has given to something else since.
            if watch is not None:
                watch.close()

    def _folders(self) -> set[Path]:
        """Where an event says a port (or a hotplug notice) may have changed."""
        notices = self.cfg.run_path / HOTPLUG_DIR
        with contextlib.suppress(OSError):
            notices.mkdir(parents=True, exist_ok=True)
        return {notices} | {watch_target(Path(s.port.port)) for s in self.ports.values()}

    def _next_due(self, now: float) -> float:
        """Seconds until a port needs looking at without an event: a read falling due (reread_s, a failed
        read's backoff, a pen reader's next question), or, without events, the next poll."""
        wait = SAFETY_RESCAN_S if self.events else float(self.cfg.agent.port_scan_s)
        for state in self.ports.values():
            if state.present:
                wait = min(wait, max(0.0, state.last_read + self._interval(state) - now))
        return wait

    def _wait(self, watch: DirWatch | None, timeout: float) -> None:
        fds = [self._wake_r] + ([watch.fileno()] if watch is not None else [])
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        if watch is not None and watch.fileno() in ready:
            watch.drain()

    def _take_hotplug_notes(self) -> None:
        for action, dev in take_hotplug_notes(self.cfg.run_path):
            if action == "add" and dev not in self.ports:
                log.info("hotplug: %s appeared", dev)
                self.ports[dev] = PortState(DevicePort(name=dev.removeprefix("/dev/"), port=dev, protocol=AUTO))
            elif action == "add":
                self.ports[dev].last_read = 0.0
            elif dev in self.ports:
                self.ports[dev].present = False
                self.ports[dev].node = None  # whatever is there at the next look is a new device

    def _interval(self, state: PortState) -> float:
        """Seconds from one read of a present port to the next: a failed read's backoff, or the rhythm."""
        if state.failures:
            return min(300.0, 5.0 * 2.0 ** min(state.failures, 6))
        if is_pen(state.port.protocol):
            # A pen is in the reader's field only while the patient holds it there: poll on every scan,
            # but a pen just read and still lying on the reader is not read again for a while.
            return PEN_SETTLE_S if state.pen_read else float(self.cfg.agent.port_scan_s)
        return float(self.cfg.agent.reread_s)

    def _scan(self, state: PortState) -> None:
        node = _node(state.port.port)
        if node is not None and node != state.node:
            # Appeared, or replaced by another node or link (unplugged and plugged in again between two
            # looks): a new device, read it now and forget the old one's failures.
            log.info("port %s: device present", state.port.port)
            state.last_read, state.failures = 0.0, 0
        state.node = node
        state.present = node is not None
        if node is None:
            return
        if state.last_read and time.monotonic() < state.last_read + self._interval(state):
            return
        state.last_read = time.monotonic()
        try:
            stored = self.read_port(state.port)
        except BufferFull:
            state.failures += 1
            return
        except NoPen as exc:  # the reader answered: no pen in its field, nothing wrong
            log.debug("port %s: %s", state.port.port, exc)
            state.pen_read = False  # taken away: the next time it is held there, read it at once
            return
        except (DriverError, GlucoagentError) as exc:
            state.failures += 1
            self.serial_errors += 1
            log.warning("port %s: %s", state.port.port, exc)
            return
        except Exception:  # e.g. termios.error from a port that vanished mid-read: never end intake for good
            state.failures += 1
            self.serial_errors += 1
            log.exception("port %s: unexpected error during the read; retrying with backoff", state.port.port)
            return
        state.failures = 0
        state.pen_read = is_pen(state.port.protocol)
        if stored:
            self.on_stored()

    def read_port(self, port: DevicePort) -> int:
        """Read one device (meter or pen) and store what is new; returns how many records were stored."""
        result = read_device(port.port, port.protocol, wall_clock=self.clock.local_naive, insulin=self.cfg.insulin)
        if not isinstance(result, MeterRead):  # a PenRead; its driver loads only with a pen configured
            kind, protocol, what, count = "pen", port.protocol, "doses", len(result.doses)
            source = f"{protocol}:{result.identity.serial}"
            seqs = self.recorder.accept_doses(source, result.doses, complete=result.complete)
        else:
            kind, protocol, what, count = "meter", result.identity.protocol, "records", len(result.readings)
            source = f"{protocol}:{result.identity.serial}"
            seqs = self.recorder.accept_readings(source, result.readings, complete=result.complete)
        self.recorder.store.source_seen(source, protocol, port.port, result.complete)
        if result.complete:
            # A pen lying on the reader is read again every minute: a read with nothing new is only debug.
            level = logging.DEBUG if kind == "pen" and not seqs else logging.INFO
            log.log(level, "%s %s on %s: %d %s, %d new", kind, source, port.port, count, what, len(seqs))
        else:
            log.warning(
                "%s %s on %s: read cut off after %d verified %s (%s); %d new stored, rest on the next read",
                kind,
                source,
                port.port,
                count,
                what,
                result.error,
                len(seqs),
            )
        return len(seqs)
