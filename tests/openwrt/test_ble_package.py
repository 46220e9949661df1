"""The BLE add-on package (glucoagent-ble): carries exactly ``BLE_MODULES``, installs beside glucoagent with
OpenWrt's real opkg and apk into offline roots, and goes again without touching the agent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support.opkg_root import opkg_root

from openwrt import build_apk, hosttools
from openwrt.build_ipk import write_ipk
from openwrt.package import BLE_MODULES, BLE_PACKAGE, PACKAGE, VENDOR_DIR, Package, describe, describe_ble

TIMEOUT = 120


@pytest.fixture(scope="module")
def packages() -> tuple[Package, Package]:
    return describe(), describe_ble()


def test_the_add_on_carries_every_ble_module_and_nothing_of_the_agent(packages: tuple[Package, Package]) -> None:
    agent, ble = packages
    paths = {e.path for e in ble.files if e.data is not None}
    for modules in BLE_MODULES.values():
        for m in modules:
            base = f"{VENDOR_DIR}/{m.replace('.', '/')}"
            assert {f"{base}.py", f"{base}/__init__.py"} & paths, m
    assert not paths & {e.path for e in agent.files if e.data is not None}  # no file owned twice
    assert sum(len(e.data) for e in ble.files if e.data is not None) <= 4_000_000  # issue 15: <= 4 MB installed
    assert [d.name for d in ble.depends] == [PACKAGE, "python3-asyncio"]


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def _root(tools: hosttools.Tools, root: Path) -> Path:
    shutil.copytree(tools.openwrt_files.root, root, symlinks=True)
    for d in ("etc/rc.d", "var/lock", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def _present(root: Path, pkg: Package) -> bool:
    return all((root / e.path.lstrip("/")).exists() for e in pkg.files if e.data is not None)


def test_opkg_installs_and_removes_the_add_on_beside_the_agent(
    openwrt_tools: hosttools.Tools, packages: tuple[Package, Package], tmp_path: Path
) -> None:
    agent, ble = packages
    out = tmp_path / "ipk"
    box = opkg_root(openwrt_tools, tmp_path, agent, write_ipk(agent, out))  # the agent and its dependencies
    _run([*box.pm.install, str(write_ipk(ble, out))], box.env)
    assert _present(box.root, agent) and _present(box.root, ble)
    opkg = [str(openwrt_tools.opkg), "--offline-root", str(box.root), "--conf", str(box.root / "etc/opkg.conf")]
    _run([*opkg, "remove", BLE_PACKAGE], box.env)
    assert _present(box.root, agent)  # the agent stays whole
    assert not any((box.root / e.path.lstrip("/")).exists() for e in ble.files if e.data is not None)


def test_apk_installs_and_removes_the_add_on_beside_the_agent(
    openwrt_tools: hosttools.Tools, packages: tuple[Package, Package], tmp_path: Path
) -> None:
    agent, ble = packages
    tools, root = openwrt_tools, _root(openwrt_tools, tmp_path / "root")
    out = tmp_path / "apk"
    out.mkdir()
    stubs = []
    for name in sorted({d.name for p in packages for d in p.depends} - {PACKAGE}):
        path = out / f"stub-{name}.apk"
        version = "3.11.9-r1" if name.startswith("python3-light") else "99-r1"
        info = [f"name:{name}", f"version:{version}", "arch:noarch"]
        _run([str(tools.apk), "mkpkg", *(a for i in info for a in ("--info", i)), "--output", str(path)], tools.env)
        stubs.append(path)
    apk = [str(tools.apk), "--root", str(root), "--allow-untrusted", "--no-network", "--force-no-chroot"]
    files = [str(build_apk.write_apk(p, out, tools.apk)) for p in packages]
    _run([*apk, "--initdb", "--no-scripts", "add", *map(str, stubs), *files], tools.env)
    assert _present(root, agent) and _present(root, ble)
    _run([*apk, "--no-scripts", "del", BLE_PACKAGE], tools.env)
    assert _present(root, agent)
    assert not any((root / e.path.lstrip("/")).exists() for e in ble.files if e.data is not None)
