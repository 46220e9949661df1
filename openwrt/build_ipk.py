"""The ``.ipk`` writer: ``dist/glucoagent_<version>-<release>_all.ipk`` for opkg (OpenWrt 24.10 and earlier).

The package is described once in ``openwrt/package.py`` (files, modes, conffiles, depends, scripts); this
module writes it in the format opkg-lede reads (``libbb/unarchive.c``): a gzip'd tar of ``./debian-binary``,
``./data.tar.gz`` and ``./control.tar.gz``, the same thing ``scripts/ipkg-build`` writes. Two builds of
the same tree give the same bytes: entries sorted by name, every mtime = SOURCE_DATE_EPOCH (or the
last commit time), uid/gid 0 with no user names, gzip without name or time.

Usage: ``python -m openwrt.build_ipk [--out dist]`` (``make ipk``); ``--stage DIR`` writes the installed
tree only, which ``openwrt/Makefile`` (OpenWrt SDK) packages.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

# The description's names stay importable from here (tests, bench and mipsroot use them).
from openwrt.package import (
    ARCH,
    CONFFILES,
    DEPENDS,
    DIR_MODE,
    EXEC_MODE,
    FILE_MODE,
    HOTPLUG,
    INIT,
    KEEP,
    LAUNCHER,
    LICENSE,
    PACKAGES,
    PREFIX,
    PYC_TAG,
    PYTHON,
    REPO,
    STDLIB_SPLIT,
    UCI_CONFIG,
    VENDOR_DIR,
    VENDORED,
    BuildError,
    Entry,
    Package,
    Vendored,
    data_entries,
    describe,
    describe_ble,
    package_version,
    source_date_epoch,
    stage,
    vendored_files,
)

__all__ = [
    "ARCH",
    "CONFFILES",
    "DEPENDS",
    "HOTPLUG",
    "INIT",
    "KEEP",
    "LAUNCHER",
    "LICENSE",
    "PACKAGES",
    "POSTINST",
    "PREFIX",
    "PRERM",
    "PYC_TAG",
    "PYTHON",
    "REPO",
    "STDLIB_SPLIT",
    "UCI_CONFIG",
    "VENDORED",
    "VENDOR_DIR",
    "BuildError",
    "Entry",
    "Vendored",
    "build_ipk",
    "control_text",
    "data_entries",
    "ipk_name",
    "main",
    "package_version",
    "source_date_epoch",
    "stage",
    "tar_gz",
    "vendored_files",
    "write_ipk",
]

# The stock scripts package-pack.mk writes for every opkg package: they hand over to default_postinst /
# default_prerm in /lib/functions.sh, which source the package's own postinst-pkg / prerm-pkg.
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


def control_text(pkg: Package, installed_size: int) -> str:
    fields = [
        ("Package", pkg.name),
        ("Version", pkg.ipk_version),
        ("Depends", ", ".join(d.ipk for d in pkg.depends)),
        ("Source", pkg.source),
        ("SourceName", pkg.name),
        ("License", pkg.license),
        ("LicenseFiles", pkg.license_files),
        ("Section", pkg.section),
        ("SourceDateEpoch", str(pkg.epoch)),
        ("Maintainer", pkg.maintainer),
        ("Architecture", pkg.arch),
        ("Installed-Size", str(installed_size)),
        ("Description", "\n ".join(pkg.description)),
    ]
    return "".join(f"{k}: {v}\n" for k, v in fields)


def ipk_name(pkg: Package) -> str:
    return f"{pkg.name}_{pkg.ipk_version}_{pkg.arch}.ipk"


def write_ipk(pkg: Package, out_dir: Path) -> Path:
    """Write ``pkg`` as an .ipk into ``out_dir`` and return its path."""
    data_gz, data_len = tar_gz(pkg.files, pkg.epoch)
    control = [
        Entry("/control", control_text(pkg, data_len).encode(), FILE_MODE),
        Entry("/conffiles", "".join(f"{p}\n" for p in pkg.conffiles).encode(), FILE_MODE),
        Entry("/postinst", POSTINST.encode(), EXEC_MODE),
        Entry("/postinst-pkg", pkg.postinst_pkg.encode(), FILE_MODE),
        Entry("/prerm", PRERM.encode(), EXEC_MODE),
    ]
    control_gz, _ = tar_gz([Entry("/", None, DIR_MODE), *sorted(control, key=lambda e: e.path)], pkg.epoch)
    outer, _ = tar_gz(
        [
            Entry("/debian-binary", b"2.0\n", FILE_MODE),
            Entry("/data.tar.gz", data_gz, FILE_MODE),
            Entry("/control.tar.gz", control_gz, FILE_MODE),
        ],
        pkg.epoch,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ipk_name(pkg)
    tmp = target.with_suffix(".ipk.tmp")
    tmp.write_bytes(outer)
    tmp.replace(target)
    return target


def build_ipk(out_dir: Path, repo: Path = REPO) -> Path:
    """Describe the package from ``repo``, write the .ipk into ``out_dir``, return its path."""
    return write_ipk(describe(repo), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_ipk", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory (default dist/)")
    parser.add_argument("--stage", type=Path, help="only write the installed tree here (for the OpenWrt SDK)")
    parser.add_argument("--ble", action="store_true", help="the BLE add-on package (glucoagent-ble) instead")
    args = parser.parse_args(argv)
    try:
        if args.stage:
            print(stage(args.stage))
            return 0
        path = write_ipk(describe_ble(), args.out) if args.ble else build_ipk(args.out)
    except BuildError as exc:
        print(f"build_ipk: {exc}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
