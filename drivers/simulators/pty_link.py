"""A pseudo-terminal whose slave end is published as a symlink, for simulators.

The simulator owns the master side; a driver opens the symlink as if it were
``/dev/ttyUSB0``. Raw mode so no byte is translated by the line discipline.
"""

from __future__ import annotations

import contextlib
import os
import select
import tty
from pathlib import Path


class PtyLink:
    def __init__(self, link: str | os.PathLike[str]) -> None:
        self.link = Path(link)
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        tty.setraw(self.master)
        self.slave_name = os.ttyname(self.slave)
        tmp = self.link.with_name(self.link.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.slave_name)
        tmp.replace(self.link)  # atomic: a reader never sees a half-made link

    def read(self, timeout: float | None = None, size: int = 4096) -> bytes:
        """Bytes the driver wrote, or b"" on timeout."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.master, size)
        except OSError:  # EIO: no process has the slave open
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.link.is_symlink():
                self.link.unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PtyLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

