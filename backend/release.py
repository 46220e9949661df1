"""Releases (docs/updates.md): sign a package's manifest with the release key, apart from the command key.

The package's name and version come from its file name as the build writes it
(``NAME_VERSION_ARCH.ipk``, ``NAME-VERSION.apk``, openwrt/build_*.py), or from the caller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path

from agent.errors import GlucoagentError
from agent.wire import cose
from agent.wire.release import Chunk, ChunkRequest, Manifest, encode_manifest
from backend.files import atomic_write

IPK_NAME_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]*)_(?P<version>[0-9][0-9.]*-[0-9]+)_[A-Za-z0-9_]+\.ipk$")
APK_NAME_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+._-]*?)-(?P<version>[0-9][0-9.]*-r[0-9]+)\.apk$")
MANIFEST_SUFFIX = ".manifest"


class ReleaseError(GlucoagentError):
    """A package that cannot be released as asked."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReleaseSpec:
    min_from: str = "0"
    downgrade: bool = False
    name: str | None = None
    version: str | None = None


def name_and_version(package: Path) -> tuple[str, str, str]:
    """(name, version, format) from the file name the build gives a package."""
    for fmt, pattern in (("ipk", IPK_NAME_RE), ("apk", APK_NAME_RE)):
        match = pattern.match(package.name)
        if match:
            return match["name"], match["version"], fmt
    raise ReleaseError(f"{package.name}: not NAME_VERSION_ARCH.ipk nor NAME-VERSION.apk; give --name and --version")


def sha256_file(path: Path) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


def make_manifest(package: Path, spec: ReleaseSpec, *, now: float | None = None) -> Manifest:
    try:
        size, digest = sha256_file(package)
    except OSError as exc:
        raise ReleaseError(f"cannot read {package}: {exc.strerror or exc}") from None
    if spec.name and spec.version:
        name, version = spec.name, spec.version
        fmt = package.suffix.lstrip(".")
    else:
        name, version, fmt = name_and_version(package)
        name, version = spec.name or name, spec.version or version
    return Manifest(
        name=name,
        version=version,
        format=fmt,
        size=size,
        sha256=digest,
        min_from=spec.min_from,
        downgrade=spec.downgrade,
        issued_at=int(time.time() if now is None else now),
    )


def sign_release(key: cose.PrivateKey, package: Path, spec: ReleaseSpec, *, now: float | None = None) -> bytes:
    """The signed manifest of ``package``. Raises ReleaseError for a package the box would refuse."""
    manifest = make_manifest(package, spec, now=now)
    try:
        return encode_manifest(key, manifest)
    except ValueError as exc:
        raise ReleaseError(f"{package.name}: {exc}") from None


class ReleaseShelf:
    """Packages the cloud released, by SHA-256 (``<home>/releases/<hex>.pkg``): the only files it serves
    to a box's chunk requests (agent/update/fetch.py)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def put(self, package: Path, digest: bytes) -> Path:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.dir / f"{digest.hex()}.pkg"
        atomic_write(target, package.read_bytes(), mode=0o644)
        return target

    def chunk(self, req: ChunkRequest) -> Chunk | None:
        """The chunk asked for, or None for a package never released (the box times out and reports it)."""
        path = self.dir / f"{req.sha256.hex()}.pkg"
        try:
            with path.open("rb") as fh:
                fh.seek(req.offset)
                data = fh.read(req.length)
        except FileNotFoundError:
            return None
        return Chunk(req.sha256, req.offset, data)
