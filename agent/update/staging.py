"""The download of one package into the state directory, resumable after a link loss, a restart or SIGKILL.

Files under ``<state>/update/``: ``package.part`` (the bytes so far) and ``progress.json`` (the signed
manifest's digest, size and the *next offset*). A chunk is appended and fsynced before the offset that
covers it is recorded (atomic_write), so after any crash the part file is at least ``next`` bytes long;
bytes beyond it are cut off on reopening and asked for again. One download at a time: a manifest with
another digest discards the previous one, so flash use is bounded by one package.

A chunk must start at the offset asked for (a reordered or stale chunk is refused) and be as long as
asked, but for the last one (a truncated chunk is refused); the whole is then checked against the
manifest's size and SHA-256 before anything uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from agent.errors import GlucoagentError
from agent.fsutil import atomic_write
from agent.wire.release import CHUNK_BYTES, Chunk, ChunkRequest, Manifest

log = logging.getLogger(__name__)

UPDATE_DIR = "update"
PART_FILE = "package.part"
PROGRESS_FILE = "progress.json"


class UpdateFailed(GlucoagentError):
    """An update step that failed; ``code`` goes into the command's result."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class Staging:
    """The one download in progress (open with ``Staging.begin``)."""

    def __init__(self, directory: Path, manifest: Manifest, next_offset: int) -> None:
        self.dir = directory
        self.manifest = manifest
        self.next = next_offset

    @property
    def part(self) -> Path:
        return self.dir / PART_FILE

    @property
    def done(self) -> bool:
        return self.next >= self.manifest.size

    @classmethod
    def begin(cls, state_dir: Path, manifest: Manifest, *, reserve_bytes: int) -> Staging:
        """Resume the download of ``manifest``, or start it; refused (``no_space``) up front when the
        bytes still to come plus ``reserve_bytes`` do not fit the free space of the state directory."""
        directory = state_dir / UPDATE_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        next_offset = 0
        progress = _read_progress(directory / PROGRESS_FILE)
        if progress is not None and progress["sha256"] == manifest.sha256.hex():
            next_offset = min(int(progress["next"]), manifest.size)
        elif progress is not None:
            log.warning("update: discarding the unfinished download of %s", progress.get("version"))
        part = directory / PART_FILE
        if next_offset == 0:
            part.unlink(missing_ok=True)
        missing = manifest.size - next_offset
        if free_bytes(directory) < missing + reserve_bytes:
            cls.discard(state_dir)
            raise UpdateFailed(
                "no_space",
                f"{missing} bytes to download and {reserve_bytes} kept free do not fit "
                f"the {free_bytes(directory)} bytes free in {directory}",
            )
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, next_offset)  # bytes beyond the recorded offset may be torn: asked for again
            os.fsync(fd)
        finally:
            os.close(fd)
        staging = cls(directory, manifest, next_offset)
        staging._record()
        if next_offset:
            log.info("update: resuming %s at byte %d of %d", manifest.version, next_offset, manifest.size)
        return staging

    def request(self) -> ChunkRequest:
        """The next chunk to ask for."""
        return ChunkRequest(self.manifest.sha256, self.next, min(CHUNK_BYTES, self.manifest.size - self.next))

    def accept(self, chunk: Chunk) -> None:
        """Append the chunk that answers ``request()``. Raises UpdateFailed (bad_chunk, no_space)."""
        want = self.request()
        if chunk.sha256 != self.manifest.sha256:
            raise UpdateFailed("bad_chunk", "chunk of another package")
        if chunk.offset != want.offset:
            raise UpdateFailed("bad_chunk", f"chunk at offset {chunk.offset}, expected {want.offset}")
        if len(chunk.data) != want.length:
            raise UpdateFailed(
                "bad_chunk", f"chunk of {len(chunk.data)} bytes at {chunk.offset}, expected {want.length}"
            )
        try:
            with self.part.open("r+b") as fh:
                fh.seek(self.next)
                fh.write(chunk.data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise UpdateFailed("no_space", f"cannot write the download: {exc.strerror or exc}") from None
        self.next += len(chunk.data)
        self._record()

    def verify(self) -> Path:
        """The complete package, checked against the signed manifest. On a mismatch the download is
        discarded (it can only be fetched again whole) and UpdateFailed (size_mismatch, sha256_mismatch)."""
        size = self.part.stat().st_size
        if size != self.manifest.size:
            self.discard(self.dir.parent)
            raise UpdateFailed("size_mismatch", f"download is {size} bytes, the manifest says {self.manifest.size}")
        digest = hashlib.sha256()
        with self.part.open("rb") as fh:
            while block := fh.read(1 << 16):
                digest.update(block)
        if digest.digest() != self.manifest.sha256:
            self.discard(self.dir.parent)
            raise UpdateFailed("sha256_mismatch", "the download's SHA-256 differs from the signed manifest's")
        return self.part

    @staticmethod
    def discard(state_dir: Path) -> None:
        for name in (PROGRESS_FILE, PART_FILE):
            (state_dir / UPDATE_DIR / name).unlink(missing_ok=True)

    def _record(self) -> None:
        m = self.manifest
        progress = {"sha256": m.sha256.hex(), "version": m.version, "size": m.size, "next": self.next}
        atomic_write(self.dir / PROGRESS_FILE, json.dumps(progress, sort_keys=True).encode())


def _read_progress(path: Path) -> dict[str, str | int] | None:
    """The recorded progress; None when there is none or it is unreadable (the download starts over)."""
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("next"), int) and isinstance(data.get("sha256"), str):
            return {"sha256": data["sha256"], "next": data["next"], "version": str(data.get("version"))}
    return None
