"""The one description of the glucoagent OpenWrt package, from which both formats are written.

``describe()`` gives a :class:`Package`: the installed tree (every file and directory with its bytes and
mode), the conffiles, the dependencies, the control fields and the package's own maintainer-script body
(``openwrt/files/glucoagent.postinst-pkg``). Two writers turn it into files:

* ``openwrt/build_ipk.py``: the ``.ipk`` that opkg installs (OpenWrt 24.10 and earlier);
* ``openwrt/build_apk.py``: the apk-tools v3 ``.apk`` (OpenWrt 25.12 and later).

Both wrap the body in the stock scripts OpenWrt's ``include/package-pack.mk`` generates for each format,
and both are reproducible: every time is ``source_date_epoch()``, the ``.pyc`` are compiled with
``UNCHECKED_HASH`` and the device path as their file name, entries are sorted and owned by root.
``stage()`` writes the installed tree into a directory (the OpenWrt SDK's input, ``openwrt/Makefile``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

__all__ = [
    "BLE_MODULES",
    "BLE_PACKAGE",
    "DEPENDS",
    "VENDORED",
    "BuildError",
    "Depend",
    "Entry",
    "Package",
    "Vendored",
    "ble_files",
    "data_entries",
    "describe",
    "describe_ble",
    "package_version",
    "source_date_epoch",
    "stage",
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
URL = "https://glucoagent.invalid/"
SOURCE = "feeds/glucoagent/glucoagent"
POSTINST_PKG = "glucoagent.postinst-pkg"
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

#: What Bluetooth LE needs on a box that has a controller (docs/ble.md "Cost"): exactly the modules
#: drivers/ble/central.py loads through a scan, a pairing and a read (tests/openwrt/test_ble_modules.py runs
#: one and compares), not bumble's apps, USB, websockets, prompt_toolkit or click. Not in the glucoagent
#: package: a box without BLE carries none of it; ``ble_files`` is what a BLE add-on package carries.
BLE_MODULES: dict[str, tuple[str, ...]] = {
    "bumble": (
        "bumble", "bumble._version", "bumble.att", "bumble.colors", "bumble.company_ids", "bumble.core",
        "bumble.crypto", "bumble.crypto.cryptography", "bumble.data_types", "bumble.device", "bumble.drivers",
        "bumble.drivers.common", "bumble.drivers.intel", "bumble.drivers.rtk", "bumble.gatt", "bumble.gatt_adapters",
        "bumble.gatt_client", "bumble.gatt_server", "bumble.hci", "bumble.host", "bumble.keys", "bumble.l2cap",
        "bumble.pairing", "bumble.profiles", "bumble.profiles.gap", "bumble.profiles.gatt_service", "bumble.sdp",
        "bumble.smp", "bumble.snoop", "bumble.transport", "bumble.transport.common", "bumble.transport.serial",
        "bumble.utils",
    ),
    "pyee": ("pyee", "pyee.asyncio", "pyee.base"),
    "pyserial-asyncio": ("serial_asyncio",),
}  # fmt: skip


def ble_files() -> list[tuple[str, bytes]]:
    """(path relative to vendor/, source bytes) of ``BLE_MODULES`` from the build venv, with the licences."""
    out: list[tuple[str, bytes]] = []
    for dist_name, modules in BLE_MODULES.items():
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise BuildError(f"{dist_name} is not installed in the build environment ({sys.prefix})") from None
        wanted = {m.replace(".", "/") + suffix for m in modules for suffix in (".py", "/__init__.py")}
        for record in sorted(dist.files or [], key=str):
            rel = str(record)
            if rel in wanted or ("dist-info/" in rel and "licen" in rel.lower()):
                out.append((rel, Path(str(record.locate())).read_bytes()))
        found = {rel for rel, _ in out}
        missing = [m for m in modules if not {m.replace(".", "/") + ".py", m.replace(".", "/") + "/__init__.py"} & found]
        if missing:
            raise BuildError(f"{dist_name}: modules not found in the build environment: {missing}")
    return out


# Paths installed on the device.
LAUNCHER = "/usr/bin/glucoagent"
INIT = "/etc/init.d/glucoagent"
UCI_CONFIG = "/etc/config/glucoagent"
HOTPLUG = "/etc/hotplug.d/tty/50-glucoagent"
KEEP = "/lib/upgrade/keep.d/glucoagent"
UPDATE_WATCHDOG = "/usr/libexec/glucoagent-update-watchdog"  # shell, independent of the agent (docs/updates.md)

DIR_MODE = 0o755
FILE_MODE = 0o644
EXEC_MODE = 0o755


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


_DEPEND = re.compile(r"^(?P<name>[a-z0-9][a-z0-9.+-]*)(?: \((?P<op>>=|<=|=|<|>) (?P<ver>[^ )]+)\))?$")


@dataclasses.dataclass(frozen=True, slots=True)
class Depend:
    """One dependency, written the way each format spells it."""

    name: str
    op: str = ""
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> Depend:
        """From the opkg spelling ``name`` or ``name (>= 3.11)``."""
        m = _DEPEND.match(text)
        if not m:
            raise BuildError(f"dependency {text!r}: expected 'name' or 'name (op version)'")
        return cls(m["name"], m["op"] or "", m["ver"] or "")

    @classmethod
    def parse_apk(cls, text: str) -> Depend:
        """From the apk spelling ``name`` or ``name>=3.11``."""
        m = re.match(r"^([a-z0-9][a-z0-9.+-]*?)(?:(>=|<=|=|<|>)(\S+))?$", text)
        if not m:
            raise BuildError(f"apk dependency {text!r}: expected 'name' or 'name<op><version>'")
        return cls(m[1], m[2] or "", m[3] or "")

    @property
    def constraint(self) -> str:
        return f"{self.op} {self.version}" if self.op else ""

    @property
    def ipk(self) -> str:
        return f"{self.name} ({self.op} {self.version})" if self.op else self.name

    @property
    def apk(self) -> str:
        # package-pack.mk drops the spaces and parentheses: "python3-light>=3.11"
        return f"{self.name}{self.op}{self.version}"


@dataclasses.dataclass(frozen=True, slots=True)
class Package:
    """Everything either format is written from."""

    name: str
    version: str  # upstream (PKG_VERSION)
    release: int  # PKG_RELEASE
    arch: str  # "all": no compiled code
    epoch: int  # SOURCE_DATE_EPOCH: every mtime in both formats
    files: tuple[Entry, ...]  # the installed tree, directories included, sorted by path
    conffiles: tuple[str, ...]
    depends: tuple[Depend, ...]
    maintainer: str
    license: str  # the package's own licence plus the vendored ones, as control/info text
    license_files: str
    section: str
    source: str
    url: str
    description: tuple[str, ...]  # first line is the summary
    postinst_pkg: str  # body the stock postinst runs after default_postinst (both formats)

    @property
    def ipk_version(self) -> str:
        """``$(PKG_VERSION)-$(PKG_RELEASE)``, as opkg's SDK writes it."""
        return f"{self.version}-{self.release}"

    @property
    def apk_version(self) -> str:
        """``$(PKG_VERSION)-r$(PKG_RELEASE)``, as OpenWrt 25.12 writes it for apk (a valid apk version)."""
        return f"{self.version}-r{self.release}"

    def file(self, path: str) -> Entry:
        for e in self.files:
            if e.path == path:
                return e
        raise KeyError(path)


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


#: Run in a fresh interpreter: marshal's output depends on the compiling process's state (reference
#: counts decide FLAG_REF; the hash seed orders frozenset constants), so compiling in the build process
#: made a .pyc differ with whatever the process had imported before (found by building twice in one run).
_COMPILER = """
import json, py_compile, sys
for src, cfile, dfile in json.load(sys.stdin):
    try:
        py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError as exc:
        print(dfile + ": does not compile: " + exc.msg, file=sys.stderr)
        sys.exit(1)
"""


def _compile_all(sources: Sequence[tuple[bytes, PurePosixPath]]) -> list[bytes]:
    """Bytecode for each (source, device path) as Python 3.11 loads it from __pycache__, unchecked-hash.

    One fresh ``python -I`` with PYTHONHASHSEED=0 compiles them all, in order, so the bytes depend on
    the sources alone, not on the state of the process that builds the package.
    """
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, (data, device_path) in enumerate(sources):
            src = Path(tmp) / f"{i}.py"
            src.write_bytes(data)
            jobs.append((str(src), str(Path(tmp) / f"{i}.pyc"), str(device_path)))
        env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        res = subprocess.run(
            [sys.executable, "-I", "-c", _COMPILER],
            input=json.dumps(jobs),
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise BuildError(res.stderr.strip() or f"the bytecode compiler exited {res.returncode}")
        return [Path(cfile).read_bytes() for _, cfile, _ in jobs]


def _python_files(dest: PurePosixPath, files: Iterable[tuple[str, bytes]]) -> list[Entry]:
    """Entries for sources (relative path, bytes) under ``dest``, each .py with its __pycache__ .pyc."""
    out: list[Entry] = []
    to_compile: list[tuple[bytes, PurePosixPath]] = []
    for rel, data in files:
        path = dest / rel
        out.append(Entry(str(path), data, FILE_MODE))
        if rel.endswith(".py"):
            to_compile.append((data, path))
    for (_, path), pyc in zip(to_compile, _compile_all(to_compile), strict=True):
        out.append(Entry(str(path.parent / "__pycache__" / f"{path.stem}.{PYC_TAG}.pyc"), pyc, FILE_MODE))
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
        Entry(UPDATE_WATCHDOG, (files_dir / "glucoagent.update-watchdog").read_bytes(), EXEC_MODE),
    ]
    entries += _parents(entries)
    return sorted(entries, key=lambda e: PurePosixPath(e.path).parts)


def _check_python() -> None:
    if sys.version_info[:2] != PYTHON:
        raise BuildError(f"build with Python {PYTHON[0]}.{PYTHON[1]} (the device's); this is {sys.version.split()[0]}")


def describe(repo: Path = REPO) -> Package:
    """The package as built from ``repo`` now."""
    _check_python()
    with (repo / "pyproject.toml").open("rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    vendored = ", ".join(f"{lib.dist} ({lib.license})" for lib in VENDORED)
    return Package(
        name=PACKAGE,
        version=version,
        release=RELEASE,
        arch=ARCH,
        epoch=source_date_epoch(repo),
        files=tuple(data_entries(repo)),
        conffiles=tuple(sorted(CONFFILES)),
        depends=tuple(Depend.parse(d) for d in DEPENDS),
        maintainer=MAINTAINER,
        license=f"{LICENSE}; vendored: {vendored}",
        license_files=f"{VENDOR_DIR}/*.dist-info/licenses/*",
        section=SECTION,
        source=SOURCE,
        url=URL,
        description=DESCRIPTION,
        postinst_pkg=(repo / "openwrt" / "files" / POSTINST_PKG).read_text(),
    )


BLE_PACKAGE = f"{PACKAGE}-ble"
BLE_DEPENDS: tuple[str, ...] = (PACKAGE, "python3-asyncio")  # bumble runs on asyncio; cryptography: glucoagent's
BLE_DESCRIPTION = (
    "Bluetooth LE glucose meters and blood-pressure cuffs for glucoagent",
    "The BLE host modules (bumble, pyee, pyserial-asyncio) the agent loads only when a",
    "`config ble` section names a controller; install it on boxes that read BLE devices.",
)


def describe_ble(repo: Path = REPO) -> Package:
    """The BLE add-on: exactly ``BLE_MODULES`` (with licences) in the agent's vendor directory, nothing else."""
    _check_python()
    with (repo / "pyproject.toml").open("rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    entries = _python_files(VENDOR_DIR, ble_files())
    entries += _parents(entries)
    return Package(
        name=BLE_PACKAGE,
        version=version,
        release=RELEASE,
        arch=ARCH,
        epoch=source_date_epoch(repo),
        files=tuple(sorted(entries, key=lambda e: PurePosixPath(e.path).parts)),
        conffiles=(),
        depends=tuple(Depend.parse(d) for d in BLE_DEPENDS),
        maintainer=MAINTAINER,
        license="Apache-2.0 (bumble), MIT (pyee), BSD-3-Clause (pyserial-asyncio)",
        license_files=f"{VENDOR_DIR}/*.dist-info/*",
        section=SECTION,
        source=SOURCE,
        url=URL,
        description=BLE_DESCRIPTION,
        postinst_pkg="",
    )


def stage(dest: Path, repo: Path = REPO, entries: Sequence[Entry] | None = None) -> Path:
    """Write the installed tree (what data.tar.gz holds) into ``dest``: the OpenWrt SDK's input."""
    if entries is None:
        _check_python()
        entries = data_entries(repo)
    for e in entries:
        path = dest / e.path.lstrip("/")
        if e.data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_bytes(e.data)
        path.chmod(e.mode)
    return dest
