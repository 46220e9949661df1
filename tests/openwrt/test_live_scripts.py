"""The maintainer scripts as they run on a live box (no IPKG_INSTROOT): install, upgrade, removal.

On the box the scripts call ``/etc/init.d/glucoagent enable|start|stop|disable`` through absolute paths, so
they run here in a chroot that is a small OpenWrt userland: busybox as /bin/sh and its applets, OpenWrt's
real rc.common, functions.sh, procd.sh and jshn, the package's files, and ``ubus`` as a stub that records
what procd would be sent. Each format gets the scripts it really ships: the .ipk's postinst/prerm (which
source postinst-pkg from /usr/lib/opkg/info) with opkg's PKG_UPGRADE, the .apk's post-install,
post-upgrade and pre-deinstall.

The upgrade case found a defect of the 25.12 path: apk runs no stop before post-upgrade and procd keeps an
instance whose command line and files did not change, so ``default_postinst``'s ``start`` left the old agent
running the old code until a reboot. postinst-pkg now restarts the service on a live upgrade.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from openwrt import build_apk as A
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import INIT, Package, describe, stage

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
UBUS = '#!/bin/sh\nprintf \'%s %s %s\\n\' "$1" "$2" "$3" >> /tmp/ubus.log\n'
LINKS = {"K10glucoagent", "S95glucoagent"}


def _copy_with_libs(binary: Path, root: Path, dest: str) -> None:
    """Put ``binary`` at ``dest`` in ``root`` with every shared library ldd resolves, at the same paths."""
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, target)
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            lib = Path(path).resolve()
            for where in {path, str(lib)}:
                inside = root / where.lstrip("/")
                if not inside.exists():
                    inside.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(lib, inside)


@pytest.fixture(scope="module")
def userland(openwrt_tools: hosttools.Tools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OpenWrt-like userland without the package, built once and copied per test."""
    root = tmp_path_factory.mktemp("userland") / "root"
    shutil.copytree(openwrt_tools.openwrt_files.root, root, symlinks=True)
    _copy_with_libs(Path(BUSYBOX), root, "/bin/busybox")
    for applet in subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split():
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    flock = shutil.which("flock")  # OpenWrt's busybox has flock; Debian's does not
    assert flock, "util-linux flock"
    _copy_with_libs(Path(flock), root, "/usr/bin/flock")
    _copy_with_libs(openwrt_tools.jshn, root, "/usr/bin/jshn")
    for lib in (openwrt_tools.root / "lib").glob("*.so*"):  # jshn's rpath is $ORIGIN/../lib
        shutil.copy2(lib, root / "usr" / "lib" / lib.name)
    (root / "usr" / "sbin").mkdir(parents=True, exist_ok=True)
    (root / "usr/sbin/ubus").write_text(UBUS)
    (root / "usr/sbin/ubus").chmod(0o755)
    for d in ("etc/rc.d", "var/lock", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def box(userland: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(userland, root, symlinks=True)
    return root


def _chroot(root: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh text) by busybox sh inside ``root``, as root; no IPKG_INSTROOT: a live box.

    A private mount namespace binds the host's /dev into the root (the scripts write to /dev/null) and
    the bind goes away with the process; ``--map-root-user`` when not root, as openwrt/mipsroot.py does.
    """
    (root / "tmp" / "script").write_text(script)
    (root / "dev").mkdir(exist_ok=True)
    ns = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    inner = 'mount --rbind /dev "$1/dev" && exec chroot "$1" /bin/sh /tmp/script'
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
    return subprocess.run(
        [*ns, "/bin/sh", "-c", inner, "sh", str(root)], env=clean, capture_output=True, text=True, timeout=60
    )


def _ubus(root: Path) -> list[str]:
    log = root / "tmp" / "ubus.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def _links(root: Path) -> set[str]:
    return {p.name for p in (root / "etc" / "rc.d").iterdir()}


SET, DELETE = "call service set", "call service delete"


def _install_files(root: Path, pkg: Package, fmt: str) -> None:
    entries = list(pkg.files) + (A.apk_meta_entries(pkg) if fmt == "apk" else [])
    for e in entries:
        (root / e.path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    stage(root, entries=entries)
    if fmt == "ipk":  # what opkg keeps in its info dir and default_postinst / default_prerm read
        info = root / "usr" / "lib" / "opkg" / "info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "glucoagent.list").write_text("".join(f"{e.path}\n" for e in pkg.files if e.data is not None))
        (info / "glucoagent.postinst-pkg").write_text(pkg.postinst_pkg)


INFO = "/usr/lib/opkg/info/glucoagent"
Step = tuple[str, dict[str, str]]


def _scripts(pkg: Package, fmt: str) -> dict[str, list[Step]]:
    """install / upgrade / remove: each script the package manager runs, with the environment it sets."""
    if fmt == "ipk":  # opkg runs <script> with its own path as $0 (default_* take the name from it)
        postinst = B.POSTINST.replace("$0 $@", f"{INFO}.postinst configure")
        return {
            "install": [(postinst, {"PKG_UPGRADE": "0"})],
            # opkg_install.c: the old package's prerm "upgrade <new>", then the new postinst
            "upgrade": [
                (B.PRERM.replace("$0 $@", f"{INFO}.prerm upgrade"), {"PKG_UPGRADE": "1"}),
                (postinst, {"PKG_UPGRADE": "1"}),
            ],
            "remove": [(B.PRERM.replace("$0 $@", f"{INFO}.prerm remove"), {"PKG_UPGRADE": "0"})],
        }
    return {
        "install": [(A.post_install(pkg), {})],
        "upgrade": [(A.post_upgrade(pkg), {})],  # apk: no pre-upgrade (no preinst), nothing stops it first
        "remove": [(A.pre_deinstall(pkg), {})],
    }


def _run(root: Path, steps: list[Step]) -> None:
    for text, env in steps:
        res = _chroot(root, text, **env)
        assert (res.returncode, res.stderr) == (0, ""), res.stdout + res.stderr


@pytest.mark.parametrize("fmt", ["ipk", "apk"])
def test_install_upgrade_remove_on_a_live_box(box: Path, fmt: str) -> None:
    pkg = describe()
    scripts = _scripts(pkg, fmt)
    _install_files(box, pkg, fmt)

    # install: enabled and started, state directory owner-only
    _run(box, scripts["install"])
    assert _links(box) == LINKS
    assert _ubus(box) == [SET]
    assert (box / "etc" / "glucoagent").stat().st_mode & 0o777 == 0o700

    # upgrade: the running instance is replaced (a delete, then a set), an enabled service stays enabled
    _run(box, scripts["upgrade"])
    calls = _ubus(box)
    assert DELETE in calls and calls[-1] == SET and calls.index(DELETE) < len(calls) - 1, calls
    assert _links(box) == LINKS

    # an upgrade leaves a disabled service disabled
    res = _chroot(box, f"{INIT} disable")
    assert res.returncode == 0
    _run(box, scripts["upgrade"])
    _ubus(box)
    assert _links(box) == set()
    res = _chroot(box, f"{INIT} enable")
    assert res.returncode == 0

    # removal: stopped and disabled
    _run(box, scripts["remove"])
    assert _ubus(box) == [DELETE]
    assert _links(box) == set()
