"""Build ``dist/glucoagent_<version>_all.ipk`` on the host, without the OpenWrt SDK, reproducibly.

The format is the one opkg-lede reads (``libbb/unarchive.c``): a gzip'd tar of ``./debian-binary``,
``./data.tar.gz`` and ``./control.tar.gz``, the same thing ``scripts/ipkg-build`` writes. Two builds of
the same tree give the same bytes: entries sorted by name, every mtime = SOURCE_DATE_EPOCH (or the
last commit time), uid/gid 0 with no user names, gzip without name or time, ``.pyc`` compiled with
``UNCHECKED_HASH`` and the device path as their file name.

Usage: ``python -m openwrt.build_ipk [--out dist]`` (``make ipk``); ``--stage DIR`` writes the installed
tree only, which ``openwrt/Makefile`` (OpenWrt SDK) packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import importlib.metadata
import io
import os
import py_compile
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

__all__ = [
    "DEPENDS",
    "VENDORED",
    "Entry",
    "Vendored",
    "build_ipk",
    "data_entries",
    "main",
    "package_version",
    "source_date_epoch",
    "stage",
    "tar_gz",
]

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "openwrt" / "files"

PACKAGE = "glucoagent"
RELEASE = 1  # PKG_RELEASE: bump when the packaging changes but the agent does not
ARCH = "all"
PREFIX = PurePosixPath("/usr/lib/glucoagent")
VENDOR_DIR = PREFIX / "vendor"
PYTHON = (3, 11)  # OpenWrt 23.05 and 24.10 ship Python 3.11; the .pyc are for it (the .py stay as fallback)
PYC_TAG = f"cpython-{PYTHON[0]}{PYTHON[1]}"
PACKAGES = ("agent", "drivers")  # shipped; backend, tests and bench are not
SOURCE_SUFFIXES = (".py", ".typed")
CONFFILES = ("/etc/config/glucoagent",)
MAINTAINER = "glucoagent developers <dev@glucoagent.invalid>"
LICENSE = "LicenseRef-Proprietary"
SECTION = "utils"
DESCRIPTION = (
    "Device agent of a connected glucometer",
    "Reads glucometers over USB serial, signs each reading (COSE_Sign1) and",
    "uploads them store-and-forward over MQTT with mutual TLS.",
)

#: OpenWrt packages (openwrt/packages lang/python, 23.05 and 24.10) the agent imports from.
#: tests/openwrt/test_ipk.py checks every stdlib split-out module the shipped code imports is covered.
DEPENDS: tuple[str, ...] = (
    "libc",
    f"python3-light (>= {PYTHON[0]}.{PYTHON[1]})",
    "python3-asyncio",  # tenacity
    "python3-ctypes",  # agent.clock
    "python3-decimal",  # cbor2
    "python3-email",  # cbor2 (MIME tag)
    "python3-logging",
    "python3-openssl",  # ssl: MQTT over mutual TLS
    "python3-sqlite3",  # store-and-forward buffer
    "python3-urllib",  # paho-mqtt
    "python3-uuid",  # cbor2, paho-mqtt
    "python3-cryptography",
    "python3-pyserial",
)

#: Stdlib modules OpenWrt moves out of python3-light, and the package holding each
#: (lang/python/python3/files/python3-package-*.mk).
STDLIB_SPLIT: dict[str, str] = {
    "asyncio": "python3-asyncio",
    "cgi": "python3-cgi",
    "cgitb": "python3-cgi",
    "ctypes": "python3-ctypes",
    "dbm": "python3-dbm",
    "decimal": "python3-decimal",
    "_decimal": "python3-decimal",
    "email": "python3-email",
    "lib2to3": "python3-lib2to3",
    "logging": "python3-logging",
    "lzma": "python3-lzma",
    "multiprocessing": "python3-multiprocessing",
    "curses": "python3-ncurses",
    "ssl": "python3-openssl",
    "_ssl": "python3-openssl",
    "_hashlib": "python3-openssl",
    "pydoc": "python3-pydoc",
    "readline": "python3-readline",
    "sqlite3": "python3-sqlite3",
    "unittest": "python3-unittest",
    "urllib": "python3-urllib",
    "uuid": "python3-uuid",
    "venv": "python3-venv",
    "ensurepip": "python3-venv",
    "xml": "python3-xml",
    "xmlrpc": "python3-xml",
    "distutils": "python3-distutils",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Vendored:
    """A library OpenWrt does not package, shipped in ``vendor/`` from the build venv."""

    dist: str  # distribution name
    top_level: tuple[str, ...]  # importable packages copied
    license: str  # SPDX expression
    version_prefix: str  # the major line we require (cbor2 6.x is compiled-only)
    url: str


VENDORED: tuple[Vendored, ...] = (
    Vendored("cbor2", ("cbor2",), "MIT", "5.", "https://github.com/agronholm/cbor2"),
    Vendored("tenacity", ("tenacity",), "Apache-2.0", "", "https://github.com/jd/tenacity"),
    Vendored("paho-mqtt", ("paho",), "EPL-2.0 OR BSD-3-Clause", "2.", "https://github.com/eclipse/paho.mqtt.python"),
)

# Paths installed on the device.
LAUNCHER = "/usr/bin/glucoagent"
INIT = "/etc/init.d/glucoagent"
UCI_CONFIG = "/etc/config/glucoagent"
HOTPLUG = "/etc/hotplug.d/tty/50-glucoagent"
KEEP = "/lib/upgrade/keep.d/glucoagent"

DIR_MODE = 0o755
FILE_MODE = 0o644
EXEC_MODE = 0o755

POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""


class BuildError(Exception):
    """The package cannot be built from this tree or environment."""


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One tar member: ``data`` None for a directory."""

    path: str  # absolute device path, "/" for the root
    data: bytes | None
    mode: int

    @property
    def arcname(self) -> str:
        return "./" if self.path == "/" else "." + self.path + ("/" if self.data is None else "")


# --- inputs ----------------------------------------------------------------------------------------


def package_version(repo: Path = REPO) -> str:
    """``<pyproject version>-<RELEASE>``, as the SDK writes ``$(PKG_VERSION)-$(PKG_RELEASE)``."""
    with (repo / "pyproject.toml").open("rb") as fh:
        return f"{tomllib.load(fh)['project']['version']}-{RELEASE}"


def source_date_epoch(repo: Path = REPO) -> int:
    """SOURCE_DATE_EPOCH if set, else the committer time of HEAD."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            return int(env)
        except ValueError:
            raise BuildError(f"SOURCE_DATE_EPOCH is not an integer: {env!r}") from None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%ct"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        raise BuildError("set SOURCE_DATE_EPOCH (no git history to take the time from)") from exc


def _compile(source: bytes, device_path: PurePosixPath) -> bytes:
    """Bytecode for ``source`` as Python 3.11 loads it from __pycache__, without checking the source mtime."""
    with tempfile.TemporaryDirectory() as tmp:
        src, pyc = Path(tmp) / "m.py", Path(tmp) / "m.pyc"
        src.write_bytes(source)
        try:
            py_compile.compile(
                str(src),
                cfile=str(pyc),
                dfile=str(device_path),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError as exc:
            raise BuildError(f"{device_path}: does not compile: {exc.msg}") from None
        return pyc.read_bytes()


def _python_files(dest: PurePosixPath, files: Iterable[tuple[str, bytes]]) -> list[Entry]:
    """Entries for sources (relative path, bytes) under ``dest``, each .py with its __pycache__ .pyc."""
    out: list[Entry] = []
    for rel, data in files:
        path = dest / rel
        out.append(Entry(str(path), data, FILE_MODE))
        if rel.endswith(".py"):
            pyc = path.parent / "__pycache__" / f"{path.stem}.{PYC_TAG}.pyc"
            out.append(Entry(str(pyc), _compile(data, path), FILE_MODE))
    return out


def _own_sources(repo: Path) -> list[tuple[str, bytes]]:
    files: list[tuple[str, bytes]] = []
    for pkg in PACKAGES:
        for path in sorted((repo / pkg).rglob("*")):
            rel = path.relative_to(repo)
            if "__pycache__" in rel.parts or not path.is_file() or not path.name.endswith(SOURCE_SUFFIXES):
                continue
            files.append((rel.as_posix(), path.read_bytes()))
    return files


def vendored_files(lib: Vendored) -> tuple[importlib.metadata.Distribution, list[tuple[str, bytes]]]:
    """(distribution, [(path relative to vendor/, bytes)]): pure-Python modules, metadata and licences."""
    try:
        dist = importlib.metadata.distribution(lib.dist)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"{lib.dist} is not installed in the build environment ({sys.prefix})") from None
    version = dist.version
    if not version.startswith(lib.version_prefix):
        raise BuildError(f"{lib.dist} {version} installed; the device needs {lib.version_prefix}x")
    files: list[tuple[str, bytes]] = []
    info = f"{dist.metadata['Name'].replace('-', '_')}-{version}.dist-info"
    for record in sorted(dist.files or [], key=str):
        parts = PurePosixPath(str(record)).parts
        if parts[0] in lib.top_level:
            if "__pycache__" in parts or not str(record).endswith(SOURCE_SUFFIXES):
                continue  # no compiled extension, no host bytecode
            files.append((str(record), Path(str(record.locate())).read_bytes()))
        elif parts[0].endswith(".dist-info") and (
            parts[1:] == ("METADATA",) or (len(parts) > 2 and parts[1] == "licenses")
        ):
            files.append((str(PurePosixPath(info, *parts[1:])), Path(str(record.locate())).read_bytes()))
    if not any(rel.startswith(f"{info}/licenses/") for rel, _ in files):
        raise BuildError(f"{lib.dist} {version}: no licence file in its metadata")
    return dist, files


def _parents(entries: Sequence[Entry]) -> list[Entry]:
    dirs = {"/"}
    for e in entries:
        for parent in PurePosixPath(e.path).parents:
            dirs.add(str(parent))
    return [Entry(d, None, DIR_MODE) for d in dirs]


def data_entries(repo: Path = REPO) -> list[Entry]:
    """Every member of data.tar.gz, directories included, sorted as ``tar --sort=name`` would."""
    entries = _python_files(PREFIX, _own_sources(repo))
    for lib in VENDORED:
        _, files = vendored_files(lib)
        entries += _python_files(VENDOR_DIR, files)
    files_dir = repo / "openwrt" / "files"
    entries += [
        Entry(LAUNCHER, (files_dir / "glucoagent.launcher").read_bytes(), EXEC_MODE),
        Entry(INIT, (files_dir / "glucoagent.init").read_bytes(), EXEC_MODE),
        Entry(UCI_CONFIG, (files_dir / "glucoagent.config").read_bytes(), FILE_MODE),
        Entry(HOTPLUG, (files_dir / "glucoagent.hotplug").read_bytes(), FILE_MODE),
        Entry(KEEP, (files_dir / "glucoagent.keep").read_bytes(), FILE_MODE),
    ]
    entries += _parents(entries)
    return sorted(entries, key=lambda e: PurePosixPath(e.path).parts)


# --- archives --------------------------------------------------------------------------------------


def tar_gz(entries: Iterable[Entry], mtime: int) -> tuple[bytes, int]:
    """(gzip'd GNU tar of ``entries`` in the given order, uncompressed tar length)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.arcname)
            ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = mtime, e.mode, 0, 0, "", ""
            if e.data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
    tar = raw.getvalue()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="", compresslevel=9) as gz:  # == gzip -n
        gz.write(tar)
    return out.getvalue(), len(tar)


def control_text(version: str, installed_size: int, epoch: int) -> str:
    vendored = ", ".join(f"{lib.dist} ({lib.license})" for lib in VENDORED)
    fields = [
        ("Package", PACKAGE),
        ("Version", version),
        ("Depends", ", ".join(DEPENDS)),
        ("Source", "feeds/glucoagent/glucoagent"),
        ("SourceName", PACKAGE),
        ("License", f"{LICENSE}; vendored: {vendored}"),
        ("LicenseFiles", f"{VENDOR_DIR}/*.dist-info/licenses/*"),
        ("Section", SECTION),
        ("SourceDateEpoch", str(epoch)),
        ("Maintainer", MAINTAINER),
        ("Architecture", ARCH),
        ("Installed-Size", str(installed_size)),
        ("Description", "\n ".join(DESCRIPTION)),
    ]
    return "".join(f"{k}: {v}\n" for k, v in fields)


def build_ipk(out_dir: Path, repo: Path = REPO) -> Path:
    """Write the package into ``out_dir`` and return its path."""
    if sys.version_info[:2] != PYTHON:
        raise BuildError(f"build with Python {PYTHON[0]}.{PYTHON[1]} (the device's); this is {sys.version.split()[0]}")
    version = package_version(repo)
    epoch = source_date_epoch(repo)
    data_gz, data_len = tar_gz(data_entries(repo), epoch)
    control = [
        Entry("/control", control_text(version, data_len, epoch).encode(), FILE_MODE),
        Entry("/conffiles", "".join(f"{p}\n" for p in sorted(CONFFILES)).encode(), FILE_MODE),
        Entry("/postinst", POSTINST.encode(), EXEC_MODE),
        Entry("/postinst-pkg", (repo / "openwrt" / "files" / "glucoagent.postinst-pkg").read_bytes(), FILE_MODE),
        Entry("/prerm", PRERM.encode(), EXEC_MODE),
    ]
    control_gz, _ = tar_gz([Entry("/", None, DIR_MODE), *sorted(control, key=lambda e: e.path)], epoch)
    outer, _ = tar_gz(
        [
            Entry("/debian-binary", b"2.0\n", FILE_MODE),
            Entry("/data.tar.gz", data_gz, FILE_MODE),
            Entry("/control.tar.gz", control_gz, FILE_MODE),
        ],
        epoch,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PACKAGE}_{version}_{ARCH}.ipk"
    tmp = target.with_suffix(".ipk.tmp")
    tmp.write_bytes(outer)
    tmp.replace(target)
    return target


def stage(dest: Path, repo: Path = REPO) -> Path:
    """Write the package's files (what data.tar.gz holds) into ``dest``: the OpenWrt SDK's input."""
    if sys.version_info[:2] != PYTHON:
        raise BuildError(f"build with Python {PYTHON[0]}.{PYTHON[1]} (the device's); this is {sys.version.split()[0]}")
    for e in data_entries(repo):
        path = dest / e.path.lstrip("/")
        if e.data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_bytes(e.data)
        path.chmod(e.mode)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_ipk", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory (default dist/)")
    parser.add_argument("--stage", type=Path, help="only write the installed tree here (for the OpenWrt SDK)")
    args = parser.parse_args(argv)
    try:
        if args.stage:
            print(stage(args.stage))
            return 0
        path = build_ipk(args.out)
    except BuildError as exc:
        print(f"build_ipk: {exc}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
