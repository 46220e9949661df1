"""An offline OpenWrt root with glucoagent installed by the real opkg (the update tests' "box")."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from agent.update.install import PackageManager, installed_version
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import FILE_MODE, Entry, Package

REPO = Path(__file__).resolve().parents[2]
WATCHDOG = REPO / "openwrt" / "files" / "glucoagent.update-watchdog"
NAME = "glucoagent"


def dep_ipks(pkg: Package, out: Path) -> list[Path]:
    """Empty stand-ins for the packages glucoagent depends on (python3-light and the rest), as an image has them."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for dep in pkg.depends:
        version = "3.11.14" if dep.name == "python3-light" else "1"
        control = f"Package: {dep.name}\nVersion: {version}-1\nArchitecture: all\n"
        control_gz, _ = B.tar_gz([Entry("/", None, 0o755), Entry("/control", control.encode(), FILE_MODE)], 0)
        data_gz, _ = B.tar_gz([Entry("/", None, 0o755)], 0)
        outer, _ = B.tar_gz(
            [
                Entry("/debian-binary", b"2.0\n", FILE_MODE),
                Entry("/data.tar.gz", data_gz, FILE_MODE),
                Entry("/control.tar.gz", control_gz, FILE_MODE),
            ],
            0,
        )
        path = out / f"{dep.name}.ipk"
        path.write_bytes(outer)
        made.append(path)
    return made


@dataclasses.dataclass
class OpkgRoot:
    root: Path
    pm: PackageManager
    install_cmd: str  # for the watchdog (its environment carries the rest)
    env: dict[str, str]

    @property
    def command_line(self) -> str:
        """The agent's ``update.install_command``: the same, with the offline root's environment."""
        return " ".join(self.pm.install)

    @property
    def running(self) -> str | None:
        return installed_version(self.pm.status_file, NAME)

    def watchdog(self, state: Path, now: int) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "GLUCOAGENT_UPDATE_INSTALL": self.install_cmd, "GLUCOAGENT_UPDATE_RESTART": "",
               "GLUCOAGENT_UPDATE_NOW": str(now)}  # fmt: skip
        return subprocess.run(
            ["sh", str(WATCHDOG), str(state)], env=env, capture_output=True, text=True, timeout=120, check=False
        )


def opkg_root(tools: hosttools.Tools, where: Path, first: Package, first_ipk: Path) -> OpkgRoot:
    """A root as base-files leave it, with the stand-in dependencies and ``first`` installed by opkg."""
    root = where / "root"
    shutil.copytree(tools.openwrt_files.root, root, symlinks=True)
    for d in ("etc/rc.d", "var/lock", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "opkg.conf").touch()
    env = {**tools.env, "IPKG_INSTROOT": str(root), "TMPDIR": str(root / "tmp")}
    opkg = [str(tools.opkg), "--offline-root", str(root), "--conf", str(root / "etc/opkg.conf")]
    opkg += ["--force-postinstall", "--add-dest", "root:/", "--add-arch", "all:100"]
    cmd = " ".join([*opkg, "install", "--force-downgrade", "--force-reinstall"])
    envs = [f"{k}={v}" for k, v in env.items() if k in ("PATH", "IPKG_INSTROOT", "TMPDIR", "LC_ALL")]
    pm = PackageManager(("env", *envs, *cmd.split()), root / "usr/lib/opkg/status")
    deps = [str(p) for p in dep_ipks(first, where / "deps")]
    out = subprocess.run([*pm.install, *deps, str(first_ipk)], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise AssertionError(f"opkg could not install {first_ipk}: {out.stdout}{out.stderr}")
    box = OpkgRoot(root, pm, cmd, env)
    if box.running != first.ipk_version:
        raise AssertionError(f"opkg records {box.running}, not {first.ipk_version}")
    return box
