"""Wait for a directory entry to change instead of polling for it: Linux inotify through ctypes.

The meter watcher (agent/meters.py) waits in ``select()`` on this watch and on its own wake-up pipe,
so a serial device node that appears or goes (``/dev/ttyUSB0`` created by the kernel or procd, a
symlink to a pseudo-terminal in tests) and a notice the hotplug script renames into
``<run_dir>/hotplug/`` end the wait at once, with no timer. Only the directories are watched, for
entries created, deleted, moved in or out, or whose attributes change (procd's chmod of a new node):
not file contents, so a log written beside a port wakes nobody.

inotify is in every OpenWrt kernel (CONFIG_INOTIFY_USER) and glibc/musl export its three calls; where
it is missing (another OS, a libc without it, the per-user watch limit reached) ``DirWatch.open``
returns None and the caller polls as before. Nothing here decides what an event means: any event is
"look again", so a lost event (a full queue: IN_Q_OVERFLOW) costs nothing but that look.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
WATCH_MASK = IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


def parse_events(buf: bytes) -> list[tuple[int, int, str]]:
    """(wd, mask, name) of each ``struct inotify_event`` in ``buf`` (what one read() returned)."""
    out: list[tuple[int, int, str]] = []
    pos = 0
    while pos + _HEADER.size <= len(buf):
        wd, mask, _cookie, size = _HEADER.unpack_from(buf, pos)
        pos += _HEADER.size
        name = buf[pos : pos + size].split(b"\0", 1)[0].decode(errors="replace")
        pos += size
        out.append((wd, mask, name))
    return out


def watch_target(path: Path) -> Path:
    """The directory to watch for ``path`` to appear: its parent, or the nearest ancestor that exists
    (``/dev/serial/by-id`` exists only while a USB serial device is plugged in)."""
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


class DirWatch:
    """An inotify descriptor watching directories; ``fileno()`` for select, ``drain()`` after it is readable."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self._fd = fd
        self._libc = libc
        self._watched: dict[int, Path] = {}  # wd -> directory

    @classmethod
    def open(cls) -> DirWatch | None:
        """A new watch, or None where inotify is not available (then the caller polls)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols, libc's among them (no ldconfig run)
            init = libc.inotify_init1
        except (OSError, AttributeError) as exc:
            log.info("no inotify (%s): ports are polled", exc)
            return None
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.info("no inotify (%s): ports are polled", os.strerror(ctypes.get_errno()))
            return None
        return cls(fd, libc)

    def fileno(self) -> int:
        return self._fd

    def watch(self, folders: set[Path]) -> tuple[bool, bool]:
        """Watch each of ``folders`` (one already watched is skipped). Returns (all watched, any new): not
        all when one could not be (then the caller must poll, e.g. the per-user limit max_user_watches is
        reached); a new watch sees nothing made before it, so the caller looks once more after one."""
        ok, new = True, False
        for folder in folders:
            if folder in self._watched.values():
                continue
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), WATCH_MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err != errno.ENOENT:  # gone meanwhile: the next pass watches its parent
                    log.warning("cannot watch %s for devices (%s): polling it", folder, os.strerror(err))
                ok = False
                continue
            self._watched[wd] = folder
            new = True
        return ok, new

    def drain(self) -> bool:
        """Read every pending event; True if any arrived. A watch the kernel dropped (its directory was
        removed or moved) is forgotten, so the next ``watch`` sets it again where the path now leads."""
        seen = False
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return seen
            if not buf:
                return seen
            for wd, mask, _name in parse_events(buf):
                seen = True
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self._watched.pop(wd, None)
                    if not mask & IN_IGNORED:
                        with contextlib.suppress(OSError):
                            self._libc.inotify_rm_watch(self._fd, wd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
