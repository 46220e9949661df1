"""The ``.apk`` writer: ``dist/glucoagent-<version>-r<release>.apk`` in apk-tools v3 format (OpenWrt 25.12+).

The package is described once in ``openwrt/package.py``; this module lays it out exactly as OpenWrt's
``include/package-pack.mk`` does for ``CONFIG_USE_APK`` and hands it to the real ``apk mkpkg``, the same
writer the OpenWrt buildroot and SDK run (``$(STAGING_DIR_HOST)/bin/apk mkpkg``):

* the installed tree, plus ``/lib/apk/packages/glucoagent.list`` (every file and link, sorted),
  ``.conffiles`` (the conffile paths) and ``.conffiles_static`` (path and SHA-256 of the shipped default),
  which OpenWrt's ``sysupgrade`` and ``apk`` read to tell a user's edit from the default;
* the maintainer scripts OpenWrt generates: ``post-install`` (``default_postinst`` then the package's
  ``postinst-pkg`` body), ``post-upgrade`` (the same with ``PKG_UPGRADE=1``) and ``pre-deinstall``
  (``default_prerm``); there is no preinst or postrm, so no ``pre-install``/``pre-upgrade``/``post-deinstall``;
* info fields ``name``, ``version`` (``0.1.0-r1``), ``description``, ``arch:noarch`` (PKGARCH all),
  ``license``, ``origin``, ``url``, ``maintainer`` and ``depends`` (``python3-light>=3.11 …``).

Why drive the real ``apk mkpkg`` rather than write the v3 format here: the v3 container (ADB: a schema'd
binary tree with per-file hashes, deflate-compressed, data blocks indexed by path and file number) has no
specification besides apk-tools' source, and OpenWrt itself builds every package with ``apk mkpkg``. Using it
means our ``.apk`` is byte-for-byte what the SDK would make from the same tree, and a format change in a
later apk-tools is picked up by building that version, not by chasing it in a second implementation.
The cost: building needs an apk 3 binary; ``--apk`` takes one (an SDK's ``staging_dir/host/bin/apk``),
otherwise it is built once from ``../shared/openwrt-tools`` by ``openwrt/hosttools.py``.

Reproducible: the tree is written fresh with fixed modes, ``SOURCE_DATE_EPOCH`` sets every mtime (apk
reads it), and ``apk mkpkg`` runs under ``fakeroot`` when not root so every file is ``root:root`` whoever
builds. ``apk mkpkg`` writes no build time; its output depends only on the tree and the info fields.

Usage: ``python -m openwrt.build_apk [--out dist] [--apk PATH | --tools-src ../shared/openwrt-tools]``
(``make apk``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from openwrt import hosttools
from openwrt.package import FILE_MODE, REPO, BuildError, Entry, Package, describe, describe_ble, stage

__all__ = [
    "apk_meta_entries",
    "apk_name",
    "build_apk",
    "find_apk_tool",
    "main",
    "mkpkg_args",
    "post_install",
    "post_upgrade",
    "pre_deinstall",
    "write_apk",
]

APK_PACKAGES = "/lib/apk/packages"
DEFAULT_TOOLS_SRC = REPO.parent / "shared" / "openwrt-tools"


def _without_shebang(body: str) -> str:
    # package-pack.mk: sed '/^\s*#!/d'
    return "".join(line for line in body.splitlines(keepends=True) if not line.lstrip().startswith("#!"))


def post_install(pkg: Package) -> str:
    """What package-pack.mk writes as ``post-install`` (OpenWrt 25.12): stock part, then postinst-pkg."""
    return (
        "#!/bin/sh\n"
        '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
        "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\n"
        'export root="${IPKG_INSTROOT}"\n'
        f'export pkgname="{pkg.name}"\n'
        "add_group_and_user\n"
        "default_postinst\n"
    ) + _without_shebang(pkg.postinst_pkg)


def post_upgrade(pkg: Package) -> str:
    """``post-upgrade``: post-install with ``PKG_UPGRADE=1`` (default_postinst then starts, not enables)."""
    return "#!/bin/sh\nexport PKG_UPGRADE=1\n" + _without_shebang(post_install(pkg))


def pre_deinstall(pkg: Package) -> str:
    """``pre-deinstall``: default_prerm (stop and disable the init script); we ship no prerm-pkg."""
    return (
        "#!/bin/sh\n"
        "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\n"
        'export root="${IPKG_INSTROOT}"\n'
        f'export pkgname="{pkg.name}"\n'
        "default_prerm\n"
    )


def apk_meta_entries(pkg: Package) -> list[Entry]:
    """``/lib/apk/packages/<name>.{list,conffiles,conffiles_static}`` as package-pack.mk makes them."""
    listed = sorted(e.path for e in pkg.files if e.data is not None)  # find -type f,l, before the meta files
    static = []
    for path in pkg.conffiles:
        data = pkg.file(path).data
        if data is not None:
            static.append(f"{path} {hashlib.sha256(data).hexdigest()}\n")
    base = f"{APK_PACKAGES}/{pkg.name}"
    return [
        Entry(f"{base}.list", "".join(f"{p}\n" for p in listed).encode(), FILE_MODE),
        Entry(f"{base}.conffiles", "".join(f"{p}\n" for p in pkg.conffiles).encode(), FILE_MODE),
        Entry(f"{base}.conffiles_static", "".join(static).encode(), FILE_MODE),
    ]


def apk_name(pkg: Package) -> str:
    return f"{pkg.name}-{pkg.apk_version}.apk"


def mkpkg_args(pkg: Package, files_dir: Path, scripts_dir: Path, output: Path) -> list[str]:
    """The ``apk mkpkg`` arguments package-pack.mk passes, for this package."""
    summary, *body = pkg.description
    description = " ".join([summary.rstrip(".") + ".", *body])
    args = [
        "mkpkg",
        "--info",
        f"name:{pkg.name}",
        "--info",
        f"version:{pkg.apk_version}",
        "--info",
        f"description:{description}",
        "--info",
        "arch:noarch" if pkg.arch == "all" else f"arch:{pkg.arch}",
        "--info",
        f"license:{pkg.license}",
        "--info",
        f"origin:{pkg.source}",
        "--info",
        f"url:{pkg.url}",
        "--info",
        f"maintainer:{pkg.maintainer}",
    ]
    for name in ("post-install", "post-upgrade", "pre-deinstall"):
        args += ["--script", f"{name}:{scripts_dir / name}"]
    args += [
        "--info",
        "depends:" + " ".join(d.apk for d in pkg.depends),
        "--files",
        str(files_dir),
        "--output",
        str(output),
    ]
    return args


def find_apk_tool(apk: Path | None, tools_src: Path) -> Path:
    """``apk`` if given, else the apk built (once) from ``tools_src`` into the tools cache."""
    if apk is not None:
        if not os.access(apk, os.X_OK):
            raise BuildError(f"{apk}: not an executable apk")
        return apk
    if not tools_src.is_dir():
        raise BuildError(f"no apk 3 to build with: pass --apk PATH or provide {tools_src} (see docs/openwrt.md)")
    try:
        return hosttools.load(hosttools.build(tools_src)).apk
    except hosttools.ToolsError as exc:
        raise BuildError(f"building apk from {tools_src}: {exc}") from None


def write_apk(pkg: Package, out_dir: Path, apk: Path) -> Path:
    """Write ``pkg`` as a v3 .apk into ``out_dir`` with the apk binary ``apk``; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / apk_name(pkg)
    with tempfile.TemporaryDirectory(prefix="glucoagent-apk.") as tmp:
        root, scripts = Path(tmp) / "root", Path(tmp) / "scripts"
        root.mkdir(mode=0o755)
        root.chmod(0o755)  # mkpkg records the root's own mode; not the umask's
        scripts.mkdir()
        meta = apk_meta_entries(pkg)
        dirs = [Entry(APK_PACKAGES.rsplit("/", 1)[0], None, 0o755), Entry(APK_PACKAGES, None, 0o755)]
        stage(root, entries=[*pkg.files, *dirs, *meta])
        for name, text in (
            ("post-install", post_install(pkg)),
            ("post-upgrade", post_upgrade(pkg)),
            ("pre-deinstall", pre_deinstall(pkg)),
        ):
            (scripts / name).write_text(text)
        tmp_out = Path(tmp) / target.name
        cmd = [str(apk), *mkpkg_args(pkg, root, scripts, tmp_out)]
        if os.geteuid() != 0:
            fakeroot = shutil.which("fakeroot")
            if fakeroot is None:
                raise BuildError("fakeroot is needed to build the .apk as a non-root user (make debs installs it)")
            cmd = [fakeroot, "--", *cmd]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(pkg.epoch), "LC_ALL": "C"}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BuildError(f"apk mkpkg failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}")
        shutil.copyfile(tmp_out, target.with_suffix(".apk.tmp"))
        target.with_suffix(".apk.tmp").replace(target)
    return target


def build_apk(out_dir: Path, repo: Path = REPO, apk: Path | None = None, tools_src: Path = DEFAULT_TOOLS_SRC) -> Path:
    """Describe the package from ``repo``, write the .apk into ``out_dir``, return its path."""
    return write_apk(describe(repo), out_dir, find_apk_tool(apk, tools_src))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_apk", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory (default dist/)")
    parser.add_argument("--apk", type=Path, help="apk 3 binary to run mkpkg with (e.g. an SDK's host apk)")
    parser.add_argument(
        "--tools-src",
        type=Path,
        default=DEFAULT_TOOLS_SRC,
        help="OpenWrt tool sources to build apk from when --apk is not given (default ../shared/openwrt-tools)",
    )
    parser.add_argument("--ble", action="store_true", help="the BLE add-on package (glucoagent-ble) instead")
    args = parser.parse_args(argv)
    try:
        if args.ble:
            path = write_apk(describe_ble(), args.out, find_apk_tool(args.apk, args.tools_src))
        else:
            path = build_apk(args.out, apk=args.apk, tools_src=args.tools_src)
    except BuildError as exc:
        print(f"build_apk: {exc}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
