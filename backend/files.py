"""Durable file writes for the cloud (CA keys, CRL, command key): temp file with the final mode, fsync,
rename, fsync the directory. A copy of ``agent.fsutil.atomic_write`` on purpose: the layering lets the
cloud import only ``agent.wire`` and the error root, so the box's file code can change without the cloud."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from agent.errors import StorageUnavailable


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old or the new file; a secret is never readable by others."""
    # A name of its own: two writers of one file (the CRL keeper and a revocation) must not share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # umask may have narrowed it
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageUnavailable(f"cannot write {path}: {exc.strerror or exc}") from exc
