"""The .ipk and the .apk installed, upgraded and removed by OpenWrt's real opkg-lede and apk-tools 3.

Each test starts from an offline root that holds what base-files would: OpenWrt's real /etc/rc.common,
/lib/functions.sh, /lib/functions/{service,procd}.sh and jshn.sh, and the /etc/rc.d and /var/lock an image
build creates. The dependencies are installed first as empty packages of the right names and versions
(python3-light 3.11.14), so the package managers resolve our Depends for real.

"As an image build runs them": for opkg, ``IPKG_NO_SCRIPT=1 IPKG_INSTROOT=R opkg --offline-root R
--force-postinstall …`` then every ``usr/lib/opkg/info/*.postinst`` run by bash with ``IPKG_INSTROOT=R``
(include/rootfs.mk ``prepare_rootfs``); for apk, ``apk --root R --initdb --no-scripts add`` then every
``*.post-install`` from ``lib/apk/db/scripts.tar*`` run the same way. Upgrades and removals let the package
manager run the scripts itself (``IPKG_INSTROOT`` set, apk with ``--preserve-env --force-no-chroot``), as
``opkg``/``apk`` do when a technician upgrades a box's image root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support import opkg_root

from openwrt import build_apk as A
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import UCI_CONFIG, Entry, Package, describe

PKG = "glucoagent"
EDIT = "\n# edited on the box by a technician\nconfig agent 'edited'\n"
TIMEOUT = 120


# --- packages -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pkg() -> Package:
    return describe()


def _next_release(pkg: Package) -> Package:
    """Release +1 whose default config changed: the package manager must still keep the user's edit."""
    config = pkg.file(UCI_CONFIG)
    assert config.data is not None
    new_default = Entry(UCI_CONFIG, config.data + b"# default of release 2\n", config.mode)
    files = tuple(new_default if e.path == UCI_CONFIG else e for e in pkg.files)
    return dataclasses.replace(pkg, release=pkg.release + 1, files=files)


@pytest.fixture(scope="module")
def ipks(pkg: Package, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("ipks")
    return B.write_ipk(pkg, out / "1"), B.write_ipk(_next_release(pkg), out / "2")


@pytest.fixture(scope="module")
def apks(pkg: Package, openwrt_tools: hosttools.Tools, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("apks")
    return (
        A.write_apk(pkg, out / "1", openwrt_tools.apk),
        A.write_apk(_next_release(pkg), out / "2", openwrt_tools.apk),
    )


@pytest.fixture(scope="module")
def dep_ipks(pkg: Package, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return opkg_root.dep_ipks(pkg, tmp_path_factory.mktemp("dep-ipks"))


@pytest.fixture(scope="module")
def dep_apks(pkg: Package, openwrt_tools: hosttools.Tools, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return opkg_root.dep_apks(openwrt_tools, pkg, tmp_path_factory.mktemp("dep-apks"))


# --- roots and the package managers ----------------------------------------------------------------------


def _run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def _base_root(tools: hosttools.Tools, root: Path) -> Path:
    """What base-files and prepare_rootfs give a root before packages arrive."""
    shutil.copytree(tools.openwrt_files.root, root, symlinks=True)
    for d in ("etc/rc.d", "var/lock", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def _env(tools: hosttools.Tools, root: Path, **extra: str) -> dict[str, str]:
    return {**tools.env, "IPKG_INSTROOT": str(root), "TMPDIR": str(root / "tmp"), **extra}


def _opkg(tools: hosttools.Tools, root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    (root / "etc" / "opkg.conf").touch()
    cmd = [str(tools.opkg), "--offline-root", str(root), "--conf", str(root / "etc" / "opkg.conf")]
    cmd += ["--force-postinstall", "--add-dest", "root:/", "--add-arch", "all:100", *args]
    return _run(cmd, _env(tools, root, **env))


def _apk(tools: hosttools.Tools, root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(tools.apk), "--root", str(root), "--allow-untrusted", "--no-network", "--force-no-chroot"]
    cmd += ["--preserve-env", "--no-logfile", *args]
    return _run(cmd, _env(tools, root), check=check)


def _run_postinst_as_image_build(tools: hosttools.Tools, root: Path, scripts: list[tuple[str, bytes]]) -> list[str]:
    """prepare_rootfs: each postinst by bash with IPKG_INSTROOT=<root>, from the root; must exit 0."""
    ran = []
    work = root / "tmp" / "postinst"
    work.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(scripts):
        path = work / name
        path.write_bytes(text)
        res = subprocess.run(
            ["bash", str(path)], cwd=root, env=_env(tools, root), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert res.returncode == 0, f"{name}: exit {res.returncode}\n{res.stdout}{res.stderr}"
        ran.append(name)
    shutil.rmtree(work)
    return ran


def _apk_scripts(root: Path, suffix: str) -> list[tuple[str, bytes]]:
    db = root / "lib" / "apk" / "db"
    (archive,) = [p for p in db.iterdir() if p.name.startswith("scripts.tar")]
    with tarfile.open(archive) as tf:  # scripts.tar (25.12's apk) or scripts.tar.gz (apk-tools 3.0.6)
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(suffix)]  # type: ignore[union-attr]


def _rc_links(root: Path) -> dict[str, str]:
    rc = root / "etc" / "rc.d"
    return {p.name: os.readlink(p) for p in sorted(rc.iterdir())} if rc.is_dir() else {}


def _installed_tree_matches(root: Path, pkg: Package, skip: frozenset[str] = frozenset()) -> None:
    for e in pkg.files:
        if e.path in skip:
            continue
        path = root / e.path.lstrip("/")
        st = path.lstat()
        assert stat.S_IMODE(st.st_mode) == e.mode, e.path
        if e.data is None:
            assert stat.S_ISDIR(st.st_mode), e.path
        else:
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(e.data).digest(), e.path


# --- opkg (OpenWrt 24.10 and earlier) ------------------------------------------------------------------------


def test_opkg_installs_upgrades_keeping_the_edit_and_removes(
    openwrt_tools: hosttools.Tools, pkg: Package, ipks: tuple[Path, Path], dep_ipks: list[Path], tmp_path: Path
) -> None:
    tools, root = openwrt_tools, _base_root(openwrt_tools, tmp_path / "root")
    v1, v2 = ipks

    # image build: opkg unpacks with scripts off, then prepare_rootfs runs every postinst
    res = _opkg(tools, root, "install", *map(str, dep_ipks), str(v1), IPKG_NO_SCRIPT="1")
    assert f"Installing {PKG} ({pkg.ipk_version})" in res.stdout
    info = root / "usr" / "lib" / "opkg" / "info"
    assert _rc_links(root) == {}  # IPKG_NO_SCRIPT: nothing ran yet
    scripts = [(p.name, p.read_bytes()) for p in info.glob("*.postinst")]
    assert _run_postinst_as_image_build(tools, root, scripts) == [f"{PKG}.postinst"]  # stubs have none
    _installed_tree_matches(root, pkg)
    assert _rc_links(root) == {"K10glucoagent": "../init.d/glucoagent", "S95glucoagent": "../init.d/glucoagent"}
    state = root / "etc" / "glucoagent"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (info / f"{PKG}.conffiles").read_text().split() == list(pkg.conffiles)
    status = (root / "usr/lib/opkg/status").read_text()
    assert f"Package: {PKG}\nVersion: {pkg.ipk_version}\n" in status
    assert " /etc/config/glucoagent " in status  # conffile recorded with the md5 of the default

    # the technician edits the config, the box holds a key; then the upgrade (opkg runs the scripts)
    config = root / "etc" / "config" / "glucoagent"
    edited = config.read_bytes() + EDIT.encode()
    config.write_bytes(edited)
    (state / "device.key").write_bytes(b"secret")
    res = _opkg(tools, root, "install", str(v2))
    assert f"Upgrading {PKG} on root from {pkg.ipk_version} to {_next_release(pkg).ipk_version}" in res.stdout
    assert config.read_bytes() == edited  # the user's file is kept
    new_default = _next_release(pkg).file(UCI_CONFIG).data
    assert (root / "etc/config/glucoagent-opkg").read_bytes() == new_default  # the new default beside it
    _installed_tree_matches(root, _next_release(pkg), skip={UCI_CONFIG})
    assert _rc_links(root) == {"K10glucoagent": "../init.d/glucoagent", "S95glucoagent": "../init.d/glucoagent"}
    assert (state / "device.key").read_bytes() == b"secret"

    # removal: prerm disables the service, the files go, the key and the user's config stay
    res = _opkg(tools, root, "remove", PKG)
    assert f"Removing package {PKG} from root" in res.stdout
    assert _rc_links(root) == {}
    for e in pkg.files:
        if e.data is not None and e.path != UCI_CONFIG:
            assert not (root / e.path.lstrip("/")).exists(), e.path
    assert config.read_bytes() == edited
    assert (state / "device.key").read_bytes() == b"secret"
    assert not (info / f"{PKG}.list").exists()


# --- apk (OpenWrt 25.12 and later) ---------------------------------------------------------------------------


def test_apk_is_read_by_the_real_apk(openwrt_tools: hosttools.Tools, pkg: Package, apks: tuple[Path, Path]) -> None:
    dump = _run([str(openwrt_tools.apk), "adbdump", str(apks[0])], openwrt_tools.env).stdout
    assert f"  name: {PKG}\n  version: {pkg.apk_version}\n" in dump
    assert "  arch: noarch\n" in dump
    for dep in pkg.depends:
        assert f"    - {dep.apk}\n" in dump
    assert "python3-light>=3.11" in dump
    for script in ("post-install", "post-upgrade", "pre-deinstall"):
        assert f"  {script}: |" in dump
    assert "pre-install" not in dump and "post-deinstall" not in dump
    # every entry is root:root whoever built it, every file has a SHA-256
    owners = {line.strip() for line in dump.splitlines() if line.strip().startswith(("user:", "group:"))}
    assert owners == {"user: root", "group: root"}
    hashes = [line.strip().removeprefix("hash: ") for line in dump.splitlines() if line.strip().startswith("hash: ")]
    expected = [hashlib.sha256(e.data).hexdigest() for e in pkg.files if e.data is not None]
    expected += [hashlib.sha256(e.data).hexdigest() for e in A.apk_meta_entries(pkg) if e.data is not None]
    assert sorted(hashes) == sorted(expected)


def test_apk_installs_upgrades_keeping_the_edit_and_removes(
    openwrt_tools: hosttools.Tools, pkg: Package, apks: tuple[Path, Path], dep_apks: list[Path], tmp_path: Path
) -> None:
    tools, root = openwrt_tools, _base_root(openwrt_tools, tmp_path / "root")
    v1, v2 = apks

    # image build: apk add with scripts off, then prepare_rootfs runs every *.post-install
    res = _apk(tools, root, "--initdb", "--no-scripts", "add", *map(str, dep_apks), str(v1))
    assert f"Installing {PKG} ({pkg.apk_version})" in res.stdout
    assert _rc_links(root) == {}
    ran = _run_postinst_as_image_build(tools, root, _apk_scripts(root, ".post-install"))
    assert len(ran) == 1 and ran[0].startswith(f"{PKG}-{pkg.apk_version}.")  # the stubs have no scripts
    _installed_tree_matches(root, pkg)
    meta = root / "lib" / "apk" / "packages"
    listed = (meta / f"{PKG}.list").read_text().split()
    assert listed == sorted(e.path for e in pkg.files if e.data is not None)
    assert (meta / f"{PKG}.conffiles").read_text().split() == list(pkg.conffiles)
    config_default = pkg.file(UCI_CONFIG).data
    assert config_default is not None
    sha = hashlib.sha256(config_default).hexdigest()
    assert (meta / f"{PKG}.conffiles_static").read_text() == f"{UCI_CONFIG} {sha}\n"
    assert _rc_links(root) == {"K10glucoagent": "../init.d/glucoagent", "S95glucoagent": "../init.d/glucoagent"}
    state = root / "etc" / "glucoagent"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    # edit, key, then `apk add` of the next release: apk runs post-upgrade itself (IPKG_INSTROOT kept)
    config = root / "etc" / "config" / "glucoagent"
    edited = config.read_bytes() + EDIT.encode()
    config.write_bytes(edited)
    (state / "device.key").write_bytes(b"secret")
    (root / "etc" / "rc.d" / "S95glucoagent").unlink()  # post-upgrade, run against a root, enables it again
    res = _apk(tools, root, "add", str(v2))
    assert f"Upgrading {PKG} ({pkg.apk_version} -> {_next_release(pkg).apk_version})" in res.stdout
    assert f"Executing {PKG}-{_next_release(pkg).apk_version}.post-upgrade" in res.stdout
    assert config.read_bytes() == edited  # the user's file is kept
    assert (root / "etc/config/glucoagent.apk-new").read_bytes() == _next_release(pkg).file(UCI_CONFIG).data
    _installed_tree_matches(root, _next_release(pkg), skip={UCI_CONFIG})
    # post-upgrade ran default_postinst against the root: with a root it (re-)enables
    assert _rc_links(root) == {"K10glucoagent": "../init.d/glucoagent", "S95glucoagent": "../init.d/glucoagent"}
    assert (state / "device.key").read_bytes() == b"secret"

    # removal: pre-deinstall disables the service; files go; the key and the edited config stay
    res = _apk(tools, root, "del", PKG)
    new = _next_release(pkg).apk_version
    assert f"Purging {PKG} ({new})\n  Executing {PKG}-{new}.pre-deinstall\n" in res.stdout
    assert _rc_links(root) == {}
    for e in pkg.files:
        if e.data is not None and e.path != UCI_CONFIG:
            assert not (root / e.path.lstrip("/")).exists(), e.path
    assert (state / "device.key").read_bytes() == b"secret"
    assert config.read_bytes() == edited


def test_apk_refuses_a_python_older_than_the_bytecode(
    openwrt_tools: hosttools.Tools, pkg: Package, apks: tuple[Path, Path], dep_apks: list[Path], tmp_path: Path
) -> None:
    """The constraint is real: python3-light 3.10 does not satisfy ``python3-light>=3.11``."""
    old = tmp_path / "python3-light.apk"
    opkg_root.stub_apk(openwrt_tools, "python3-light", "3.10.13-r1", old)
    deps = [str(p) for p in dep_apks if p.name != "python3-light.apk"] + [str(old)]
    root = _base_root(openwrt_tools, tmp_path / "root")
    res = _apk(openwrt_tools, root, "--initdb", "--no-scripts", "add", *deps, str(apks[0]), check=False)
    assert res.returncode != 0
    assert "python3-light>=3.11" in res.stderr + res.stdout


def test_make_apk_twice_gives_the_same_bytes(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    first = A.build_apk(tmp_path / "a", apk=openwrt_tools.apk)
    os.utime(Path(A.__file__).resolve().parents[1] / "agent" / "uci.py")  # a source mtime must not leak in
    again = A.build_apk(tmp_path / "b", apk=openwrt_tools.apk)
    assert first.name == again.name == f"{PKG}-{describe().apk_version}.apk"
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(again.read_bytes()).digest()


def test_ipk_and_apk_install_the_same_tree(
    openwrt_tools: hosttools.Tools, pkg: Package, ipks: tuple[Path, Path], apks: tuple[Path, Path], tmp_path: Path
) -> None:
    """One description, two formats: the extracted trees are identical apart from apk's own metadata."""
    ipk_tree: dict[str, bytes] = {}
    with tarfile.open(ipks[0], "r:gz") as outer:
        data = outer.extractfile("./data.tar.gz").read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile():
                ipk_tree["/" + m.name.removeprefix("./")] = tf.extractfile(m).read()  # type: ignore[union-attr]
    dest = tmp_path / "x"
    dest.mkdir()
    _run(
        [str(openwrt_tools.apk), "extract", "--allow-untrusted", "--destination", str(dest), str(apks[0])],
        openwrt_tools.env,
    )
    apk_tree = {"/" + p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    meta = {f"/lib/apk/packages/{PKG}.{s}" for s in ("list", "conffiles", "conffiles_static")}
    assert set(apk_tree) - set(ipk_tree) == meta
    assert {k: v for k, v in apk_tree.items() if k not in meta} == ipk_tree


def test_apk_from_a_signed_feed(
    openwrt_tools: hosttools.Tools, pkg: Package, apks: tuple[Path, Path], dep_apks: list[Path], tmp_path: Path
) -> None:
    """A feed as docs/openwrt.md describes it: packages.adb signed with our key; the box trusts only its keys."""
    feed, keys, other = tmp_path / "feed", tmp_path / "keys", tmp_path / "other-keys"
    for d in (feed, keys, other):
        d.mkdir()
    for p in [*dep_apks, apks[0]]:
        shutil.copy2(p, feed / p.name)
    priv = tmp_path / "feed-key.pem"
    _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(priv)], openwrt_tools.env)
    _run(["openssl", "ec", "-in", str(priv), "-pubout", "-out", str(keys / "glucoagent.pem")], openwrt_tools.env)
    apk = str(openwrt_tools.apk)
    index = feed / "packages.adb"
    members = sorted(str(p) for p in feed.glob("*.apk"))
    _run(
        [apk, "mkndx", "--allow-untrusted", "--sign-key", str(priv), "--output", str(index), *members],
        openwrt_tools.env,
    )

    def add(keys_dir: Path, root: Path) -> subprocess.CompletedProcess[str]:
        root.mkdir()
        cmd = [apk, "--root", str(root), "--initdb", "--keys-dir", str(keys_dir), "--repository", str(index)]
        cmd += ["--no-network", "--force-no-chroot", "--no-scripts", "--no-logfile", "add", PKG]
        return _run(cmd, openwrt_tools.env, check=False)

    trusted = add(keys, tmp_path / "trusted")
    assert trusted.returncode == 0, trusted.stderr
    assert f"Installing {PKG} ({pkg.apk_version})" in trusted.stdout
    untrusted = add(other, tmp_path / "untrusted")  # no --allow-untrusted, key not installed: refused
    assert untrusted.returncode != 0
    assert f"{PKG} (no such package)" in untrusted.stderr + untrusted.stdout


def test_apk_built_by_a_non_root_user_is_the_same(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    """As uid 65534 (a user namespace) the build goes through fakeroot and still says root:root: same bytes."""
    repo = Path(A.__file__).resolve().parents[1]
    env = {**openwrt_tools.env, "SOURCE_DATE_EPOCH": str(describe().epoch)}
    cmd = [sys.executable, "-m", "openwrt.build_apk", "--apk", str(openwrt_tools.apk)]
    as_user = ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
    probe = subprocess.run([*as_user, "id", "-u"], capture_output=True, text=True, check=True, timeout=TIMEOUT)
    assert probe.stdout.strip() == "65534"
    for who, prefix in (("root", []), ("user", as_user)):
        res = subprocess.run(
            [*prefix, *cmd, "--out", str(tmp_path / who)], cwd=repo, env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
    (mine,) = (tmp_path / "root").iterdir()
    (theirs,) = (tmp_path / "user").iterdir()
    assert mine.read_bytes() == theirs.read_bytes()
