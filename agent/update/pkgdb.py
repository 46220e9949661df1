"""The package database and the update marker files, read at every health sample by the running daemon:
which version is installed (opkg's or apk's database), which package manager the box has, and the
``KEY=value`` files the shell watchdog shares with the agent. Kept apart from the installer so the
daemon's steady state holds only this (docs/field.md, tests/system/test_steady_imports.py).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

from agent.fsutil import atomic_write

KEY_RE = re.compile(r"^[A-Z_]+$")


@dataclasses.dataclass(frozen=True, slots=True)
class PackageManager:
    """How this box installs a package file (opkg on 24.10, apk on 25.12+; a test root in tests)."""

    install: tuple[str, ...]  # argv; the package path is appended
    status_file: Path  # opkg: <root>/usr/lib/opkg/status; apk: <root>/lib/apk/db/installed

    @property
    def format(self) -> str:
        """The package format it installs: apk's database is ``installed``, opkg's ``status``."""
        return "apk" if self.status_file.name == APK.status_file.name else "ipk"

    @classmethod
    def parse(cls, command: str, status_file: str, root: Path = Path("/")) -> PackageManager:
        """The configured one; what is left empty is what the box has: apk when its database exists
        (OpenWrt 25.12+), else opkg (24.10). The shell watchdog chooses the same way (``command -v apk``)."""
        found = APK if (root / APK.status_file.relative_to("/")).exists() else OPKG
        return cls(
            tuple(shlex.split(command)) if command.strip() else found.install,
            Path(status_file) if status_file else found.status_file,
        )


OPKG = PackageManager(("opkg", "install", "--force-downgrade", "--force-reinstall"), Path("/usr/lib/opkg/status"))
APK = PackageManager(("apk", "add", "--allow-untrusted", "--no-network"), Path("/lib/apk/db/installed"))


def installed_version(status_file: Path, name: str) -> str | None:
    """The version the package database records for ``name`` (opkg ``Package:``/``Version:`` blocks,
    apk ``P:``/``V:`` blocks), or None when it is not installed."""
    try:
        text = status_file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
        if fields.get("Package", fields.get("P")) == name:
            return fields.get("Version", fields.get("V"))
    return None


def write_marker(path: Path, fields: dict[str, str]) -> None:
    for key, value in fields.items():
        if not KEY_RE.match(key) or "\n" in value or "=" in key:
            raise ValueError(f"bad marker field {key!r}")
    atomic_write(path, "".join(f"{k}={v}\n" for k, v in fields.items()).encode())


def read_marker(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and KEY_RE.match(key):
            out[key] = value
    return out
