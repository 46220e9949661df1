"""Forgetting who the box is: what a deprovision wipes, each file overwritten before it is unlinked."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.config import Config


def wipe_state(cfg: Config) -> None:
    """What `glucoagent deprovision` wipes: everything in the state directory but the factory files, and the buffer.

    Each file is overwritten in place, then unlinked (docs/security.md "Deletion"): an unlink alone
    leaves the bytes in the file's blocks, readable through any other link or open descriptor and
    from the raw storage. The key goes first: without it nothing else signs or proves anything.
    """
    state = cfg.agent.state_dir
    factory = state / "factory"
    children = sorted(state.iterdir() if state.exists() else [], key=lambda p: p.name != "device.key")
    for child in children:
        if child == factory:
            continue  # the factory claim certificate stays: the box can be enrolled again
        shred(child)
    if cfg.buffer_path.parent != state:
        for p in cfg.buffer_path.parent.glob(cfg.buffer_path.name + "*"):
            shred(p)


WIPE_CHUNK = 65_536


def shred(path: Path) -> None:
    """Overwrite a file's bytes with zeros in place (fsync), then unlink; a directory recursively."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            shred(child)
        with contextlib.suppress(FileNotFoundError, OSError):
            path.rmdir()
        return
    if path.is_file() and not path.is_symlink():
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            left = os.fstat(fd).st_size
            zeros = bytes(WIPE_CHUNK)
            while left > 0:
                left -= os.write(fd, zeros[: min(left, WIPE_CHUNK)])
            os.fsync(fd)
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
