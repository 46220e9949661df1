"""A box for the update demo, bench and tests: an offline OpenWrt root in which the real opkg (24.10) or apk
(25.12+), built from ../shared/openwrt-tools by openwrt/hosttools.py, installs glucoagent; the agent run from
that root (its own launcher and code); the installed watchdog; procd's respawn and cron played by the rig.

The root is what base-files leave (OpenWrt's real shell library) plus empty stand-ins for the packages
glucoagent depends on (python3-light and the rest), as an image has them. The host's interpreter runs the
installed code: the same Python 3.11 and libraries the box has (the emulated MIPS device is
tests/openwrt/test_emulated_*; here the point is the update, not the instruction set).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

from agent.update.pkgdb import PackageManager, installed_version
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import FILE_MODE, LAUNCHER, PREFIX, UPDATE_WATCHDOG, Entry, Package

REPO = Path(__file__).resolve().parents[1]
WATCHDOG = REPO / "openwrt" / "files" / "glucoagent.update-watchdog"
NAME = "glucoagent"
#: Versions the stand-in dependencies claim: python3-light as on 24.10; the rest any.
DEP_VERSION = {"python3-light": "3.11.14"}
TIMEOUT_S = 120

#: Runs the root's own launcher with its absolute /usr/lib/glucoagent mapped into the root (argv[1]).
_RUN_INSTALLED = (
    "import sys; root = sys.argv.pop(1); sys.argv[0] = root + {launcher!r}; "
    "src = open(sys.argv[0]).read().replace({prefix!r}, root + {prefix!r}); "
    "exec(compile(src, sys.argv[0], 'exec'), {{'__name__': '__main__'}})"
).format(launcher=LAUNCHER, prefix=str(PREFIX))


def dep_ipks(pkg: Package, out: Path) -> list[Path]:
    """Empty stand-ins for the packages glucoagent depends on, as .ipk files."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for dep in pkg.depends:
        control = f"Package: {dep.name}\nVersion: {DEP_VERSION.get(dep.name, '1')}-1\nArchitecture: all\n"
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


def stub_apk(tools: hosttools.Tools, name: str, version: str, path: Path) -> Path:
    """An empty package standing for an OpenWrt feed package of that name and version (``apk mkpkg``)."""
    info = [f"name:{name}", f"version:{version}", "arch:noarch"]
    _run([str(tools.apk), "mkpkg", *(a for i in info for a in ("--info", i)), "--output", str(path)], tools.env)
    return path


def dep_apks(tools: hosttools.Tools, pkg: Package, out: Path) -> list[Path]:
    """The same stand-ins as .apk files, made by the real ``apk mkpkg``."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        stub_apk(tools, dep.name, f"{DEP_VERSION.get(dep.name, '1')}-r1", out / f"{dep.name}.apk")
        for dep in pkg.depends
    ]


def _run(argv: list[str], env: dict[str, str]) -> None:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {out.returncode}: {out.stdout}{out.stderr}")


@dataclasses.dataclass
class BoxRoot:
    """An offline root and the package manager that installs into it."""

    root: Path
    format: str  # "ipk" (opkg) or "apk"
    pm: PackageManager  # what the agent runs (``update.install_command``/``update.status_file``)
    install_cmd: str  # the same for the watchdog, whose environment carries the rest
    env: dict[str, str]

    @property
    def command_line(self) -> str:
        """The agent's ``update.install_command``: the package manager with the offline root's environment."""
        return " ".join(self.pm.install)

    @property
    def running(self) -> str | None:
        return installed_version(self.pm.status_file, NAME)

    @property
    def installed_watchdog(self) -> Path:
        return self.root / UPDATE_WATCHDOG.lstrip("/")

    def watchdog(
        self, state: Path, now: int | None = None, *, script: Path = WATCHDOG, restart: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """One run of the watchdog, as cron runs it (``now``: pretend the time is this)."""
        env = {**self.env, "GLUCOAGENT_UPDATE_INSTALL": self.install_cmd, "GLUCOAGENT_UPDATE_RESTART": restart}
        if now is not None:
            env["GLUCOAGENT_UPDATE_NOW"] = str(now)
        return subprocess.run(
            ["sh", str(script), str(state)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )

    def agent_argv(self, *args: str) -> list[str]:
        """The installed agent (the root's launcher and code), as procd runs ``/usr/bin/glucoagent``."""
        return [sys.executable, "-c", _RUN_INSTALLED, str(self.root), *args]


def _base_root(tools: hosttools.Tools, where: Path) -> Path:
    root = where / "root"
    shutil.copytree(tools.openwrt_files.root, root, symlinks=True)
    for d in ("etc/rc.d", "var/lock", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def _installed(box: BoxRoot, version: str) -> BoxRoot:
    if box.running != version:
        raise RuntimeError(f"the package database records {box.running}, not {version}")
    return box


def opkg_root(tools: hosttools.Tools, where: Path, first: Package, first_ipk: Path) -> BoxRoot:
    """A 24.10 root with the stand-in dependencies and ``first`` installed by opkg."""
    root = _base_root(tools, where)
    (root / "etc" / "opkg.conf").touch()
    env = {**tools.env, "IPKG_INSTROOT": str(root), "TMPDIR": str(root / "tmp")}
    opkg = [str(tools.opkg), "--offline-root", str(root), "--conf", str(root / "etc/opkg.conf")]
    opkg += ["--force-postinstall", "--add-dest", "root:/", "--add-arch", "all:100"]
    cmd = " ".join([*opkg, "install", "--force-downgrade", "--force-reinstall"])
    envs = [f"{k}={v}" for k, v in env.items() if k in ("PATH", "IPKG_INSTROOT", "TMPDIR", "LC_ALL")]
    pm = PackageManager(("env", *envs, *cmd.split()), root / "usr/lib/opkg/status")
    _run([*pm.install, *map(str, dep_ipks(first, where / "deps")), str(first_ipk)], env)
    return _installed(BoxRoot(root, "ipk", pm, cmd, env), first.ipk_version)


def apk_root(tools: hosttools.Tools, where: Path, first: Package, first_apk: Path) -> BoxRoot:
    """A 25.12 root with the stand-in dependencies and ``first`` installed by apk (``--initdb`` first)."""
    root = _base_root(tools, where)
    env = {**tools.env, "IPKG_INSTROOT": str(root), "TMPDIR": str(root / "tmp")}
    apk = [str(tools.apk), "--root", str(root), "--allow-untrusted", "--no-network", "--force-no-chroot"]
    apk += ["--preserve-env", "--no-logfile"]
    _run([*apk, "--initdb", "add", *map(str, dep_apks(tools, first, where / "deps"))], env)
    cmd = " ".join([*apk, "add"])
    envs = [f"{k}={v}" for k, v in env.items() if k in ("PATH", "IPKG_INSTROOT", "TMPDIR", "LC_ALL")]
    pm = PackageManager(("env", *envs, *cmd.split()), root / "lib/apk/db/installed")
    _run([*pm.install, str(first_apk)], env)
    return _installed(BoxRoot(root, "apk", pm, cmd, env), first.apk_version)
