"""Build OpenWrt's own tools (uci, opkg-lede, apk-tools 3, jshn) for the tests, once, outside the work tree.

The sources are the unmodified upstream tarballs in ``../shared/openwrt-tools`` (see its README). They are
extracted into a temporary directory (the shared directory is read-only in CI and nothing is copied into the
project), built with cmake / meson, and installed into

    ${GLUCOAGENT_TOOLS_CACHE:-~/.cache/glucoagent}/openwrt-tools/<hash of the sources>/
        bin/uci bin/opkg bin/apk bin/jshn   runnable as they are ($ORIGIN rpath, apk linked statically)
        lib/                                libubox, libuci, libblobmsg_json
        share/jshn.sh                       what procd.sh sources
        share/openwrt-files/                the real rc.common, functions.sh, service.sh, procd.sh

The directory name is a hash of the source tarballs, OpenWrt's files and this builder's recipe, so a new
source or recipe gives a new directory and an existing complete one is used as is (``.complete`` marks it).
A build goes into a sibling temporary directory renamed into place at the end, under a lock, so two test
runs never see half a tool set.

Usage: ``python -m openwrt.hosttools [--src ../shared/openwrt-tools]`` prints the directory (``make test``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RECIPE", "OpenWrtFiles", "Tools", "ToolsError", "build", "cache_dir", "load", "main", "source_hash"]

log = logging.getLogger("openwrt.hosttools")

#: Bump when the build steps below change, so the cache key changes with them.
RECIPE = "3"

#: tarball name prefix -> directory the tarball extracts to
TARBALLS = ("libubox", "uci", "opkg-lede", "apk-tools")
OPENWRT_FILES = (
    "etc/rc.common",
    "lib/functions.sh",
    "lib/functions/service.sh",
    "lib/functions/procd.sh",
    "usr/share/libubox/jshn.sh",
)
#: What a complete cache directory holds (relative paths); the tests' fixture checks the same list.
PRODUCTS = (
    "bin/uci",
    "bin/opkg",
    "bin/apk",
    "bin/jshn",
    "share/jshn.sh",
    "lib/libubox.so",
    "lib/libuci.so",
    *(f"share/openwrt-files/{f}" for f in OPENWRT_FILES),
)
C_FLAGS = "-Wno-error"  # newer compilers warn where these sources were written


class ToolsError(Exception):
    """The tools cannot be built here (missing source, compiler or Debian package)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OpenWrtFiles:
    """OpenWrt's real shell library, laid out as on the box under ``root``."""

    root: Path
    rc_common: Path
    functions_sh: Path
    service_sh: Path
    procd_sh: Path
    jshn_sh: Path


@dataclasses.dataclass(frozen=True, slots=True)
class Tools:
    """A complete tool set: the binaries run directly; ``env`` puts them first on PATH."""

    root: Path
    uci: Path
    opkg: Path
    apk: Path
    jshn: Path
    jshn_sh: Path
    openwrt_files: OpenWrtFiles
    env: dict[str, str]


def load(root: Path) -> Tools:
    """The tool set in a cache directory ``build`` made; ToolsError naming what is missing."""
    missing = [p for p in PRODUCTS if not (root / p).exists()]
    if missing or not (root / ".complete").is_file():
        raise ToolsError(f"{root}: not a complete OpenWrt tool set (missing: {', '.join(missing) or '.complete'})")
    files = root / "share" / "openwrt-files"
    env = {k: v for k, v in os.environ.items() if k not in ("IPKG_INSTROOT", "IPKG_NO_SCRIPT")}
    env["PATH"] = f"{root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["LC_ALL"] = "C"
    return Tools(
        root=root,
        uci=root / "bin" / "uci",
        opkg=root / "bin" / "opkg",
        apk=root / "bin" / "apk",
        jshn=root / "bin" / "jshn",
        jshn_sh=root / "share" / "jshn.sh",
        openwrt_files=OpenWrtFiles(
            root=files,
            rc_common=files / "etc/rc.common",
            functions_sh=files / "lib/functions.sh",
            service_sh=files / "lib/functions/service.sh",
            procd_sh=files / "lib/functions/procd.sh",
            jshn_sh=files / "usr/share/libubox/jshn.sh",
        ),
        env=env,
    )


def _tarball(src: Path, name: str) -> Path:
    found = sorted(src.glob(f"{name}-*.tar.gz"))
    if len(found) != 1:
        raise ToolsError(f"{src}: expected one {name}-*.tar.gz, found {len(found)}")
    return found[0]


def source_hash(src: Path) -> str:
    """Hash of every input: the tarballs, OpenWrt's files and the recipe (first 16 hex digits)."""
    h = hashlib.sha256(f"recipe {RECIPE}\n".encode())
    inputs = [_tarball(src, n) for n in TARBALLS] + [src / "openwrt-files" / f for f in OPENWRT_FILES]
    for path in inputs:
        if not path.is_file():
            raise ToolsError(f"{path}: missing")
        h.update(f"{path.relative_to(src).as_posix()}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def cache_dir(src: Path) -> Path:
    base = Path(os.environ.get("GLUCOAGENT_TOOLS_CACHE") or Path.home() / ".cache" / "glucoagent")
    return base / "openwrt-tools" / source_hash(src)


def _run(cmd: Sequence[str], cwd: Path, logfile: Path) -> None:
    with logfile.open("ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        try:
            rc = subprocess.run(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        except FileNotFoundError:
            raise ToolsError(f"{cmd[0]} not found (make debs installs cmake, meson, ninja-build)") from None
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        raise ToolsError(f"{' '.join(cmd[:3])} failed (exit {rc}); last lines:\n" + "\n".join(tail))


def _extract(tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as tf:
        tops = {m.name.split("/", 1)[0] for m in tf.getmembers()}
        tf.extractall(into, filter="data")
    if len(tops) != 1:
        raise ToolsError(f"{tarball}: expected one top directory, found {sorted(tops)}")
    return into / tops.pop()


def _cmake(source: Path, build: Path, prefix: Path, logfile: Path, *options: str) -> None:
    jobs = str(min(2, os.cpu_count() or 1))
    _run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build),
            f"-DCMAKE_INSTALL_PREFIX={prefix}",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DCMAKE_C_FLAGS={C_FLAGS} -I{prefix}/include",
            "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib",  # relocatable: the tree is built elsewhere and renamed
            "-DCMAKE_BUILD_TYPE=Release",
            *options,
        ],
        build.parent,
        logfile,
    )
    _run(["cmake", "--build", str(build), "-j", jobs], build.parent, logfile)
    _run(["cmake", "--install", str(build)], build.parent, logfile)


def _build_into(src: Path, prefix: Path, work: Path) -> None:
    logfile = work / "build.log"
    trees = {name: _extract(_tarball(src, name), work / "src") for name in TARBALLS}
    _cmake(trees["libubox"], work / "b-libubox", prefix, logfile, "-DBUILD_LUA=OFF", "-DBUILD_EXAMPLES=OFF")
    _cmake(trees["uci"], work / "b-uci", prefix, logfile, "-DBUILD_LUA=OFF", "-DBUILD_TESTS=OFF")
    _cmake(trees["opkg-lede"], work / "b-opkg", prefix, logfile, "-DBUILD_TESTS=OFF", "-DVERSION=opkg-lede")
    # apk: libapk linked statically, so bin/apk needs no rpath.
    apk_build = work / "b-apk"
    _run(
        [
            "meson",
            "setup",
            str(apk_build),
            "-Ddefault_library=static",
            "-Dlua=disabled",
            "-Ddocs=disabled",
            "-Dpython=disabled",
            "-Dtests=disabled",
            "-Dhelp=disabled",
        ],
        trees["apk-tools"],
        logfile,
    )
    _run(["ninja", "-C", str(apk_build), "-j", str(min(2, os.cpu_count() or 1))], trees["apk-tools"], logfile)
    bin_dir = prefix / "bin"
    shutil.copy2(apk_build / "src" / "apk", bin_dir / "apk")
    shutil.copy2(bin_dir / "opkg-cl", bin_dir / "opkg")
    share = prefix / "share"
    shutil.copy2(src / "openwrt-files" / "usr/share/libubox/jshn.sh", share / "jshn.sh")
    for rel in OPENWRT_FILES:
        dest = share / "openwrt-files" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "openwrt-files" / rel, dest)
        dest.chmod(0o755 if rel == "etc/rc.common" else 0o644)


def build(src: Path) -> Path:
    """The cache directory for ``src``, built if it is not complete yet."""
    src = src.resolve()
    target = cache_dir(src)
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first build, then finds it complete
        if (target / ".complete").is_file():
            return target
        log.info("building OpenWrt tools from %s into %s", src, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            with tempfile.TemporaryDirectory(prefix="openwrt-tools-build.") as work:
                _build_into(src, staging, Path(work))
            missing = [p for p in PRODUCTS if not (staging / p).exists()]
            if missing:
                raise ToolsError(f"build finished without {', '.join(missing)}")
            (staging / ".complete").write_text(f"sources {src}\n")
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hosttools", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/openwrt-tools"), help="the shared sources")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hosttools: %(message)s", stream=sys.stderr)
    try:
        print(build(args.src))
    except (ToolsError, OSError) as exc:
        print(f"hosttools: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
