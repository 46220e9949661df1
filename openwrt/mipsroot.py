"""An emulated device: a MIPS little-endian (mipsel) root file system run under ``qemu-mipsel-static``.

OpenWrt's mipsel_24kc targets (MT7621 routers) run Python 3.11; Debian bookworm has the same
interpreter for mipsel, with cryptography, pyserial and sqlite. :func:`build_root` downloads those
.debs with a private apt instance (the host's apt configuration and dpkg database are left alone: no
``dpkg --add-architecture``), unpacks them with ``dpkg-deb -x`` and caches the result under
``build/mipsroot``. :func:`install_ipk` copies the cached root (hard links), does what opkg does
offline (data.tar.gz unpacked, ``/usr/lib/opkg/info/<pkg>.*`` and status written) and runs the
package's postinst with ``IPKG_INSTROOT`` set, sourcing a stand-in ``/lib/functions.sh``.
:func:`run_in_root` starts a program of the root under qemu-user.

How a program runs: in a private mount namespace (``unshare --mount``, plus ``--map-root-user`` when
not root) the host's /dev, /proc, /sys and /tmp and the static qemu binary are bind-mounted into the
root, then ``chroot`` and ``qemu-mipsel-static -0 <argv0> <argv0> args...``. The mounts vanish with
the process; nothing is left mounted on the host. The guest sees only the root's files (qemu's ``-L``
path remapping is not used: qemu 7.2 does not remap ``statx``, so imports would stat the host's
files), the host's devices (a pty for a simulated meter), its /tmp and its network. Scripts run
through their ``#!`` interpreter. No binfmt_misc is needed, which also means a guest program cannot
exec *another* guest binary (a shell script calling ``python3``): the launcher
``/usr/bin/glucoagent`` is a Python script for that reason.

Usage: ``python -m openwrt.mipsroot [--cache build/mipsroot] [--ipk dist/x.ipk] -- /usr/bin/glucoagent --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "DEBIAN_PACKAGES",
    "RootError",
    "build_root",
    "install_ipk",
    "qemu_argv",
    "root_info",
    "run_in_root",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "build" / "mipsroot"
FUNCTIONS_SH = Path(__file__).resolve().parent / "emul" / "functions.sh"

ARCH = "mipsel"
SUITE = "bookworm"
MIRROR = os.environ.get("GLUCOAGENT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
QEMU = os.environ.get("GLUCOAGENT_QEMU", "qemu-mipsel-static")
#: What the agent needs from the OS; apt adds the dependency closure (libc6, libssl3, libsqlite3-0 ...).
DEBIAN_PACKAGES: tuple[str, ...] = ("python3.11", "libpython3.11-stdlib", "python3-cryptography", "python3-serial")
#: Bump when the recipe below changes, so cached roots are rebuilt.
RECIPE = 2
#: Mount points for the host's directories (see :func:`run_in_root`).
BIND_DIRS = ("dev", "proc", "sys", "tmp")
#: Host files bound over placeholders so names resolve as on the host (localhost, the test broker).
BIND_FILES = ("etc/hosts", "etc/resolv.conf")
GUEST_QEMU = "/usr/libexec/qemu-mipsel-static"
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"
GUEST_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "PYTHONNOUSERSITE": "1",
    "TZ": "UTC",
}


class RootError(Exception):
    """The emulated root could not be built or used."""


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise RootError(f"{argv[0]}: not installed") from None
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-5:]
        raise RootError(f"{' '.join(argv[:3])} ... failed ({exc.returncode}): {' | '.join(tail)}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache (parallel test workers wait instead of racing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _key(packages: Sequence[str]) -> str:
    spec = json.dumps({"arch": ARCH, "suite": SUITE, "mirror": MIRROR, "pkgs": sorted(packages), "recipe": RECIPE})
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def _apt(state: Path) -> list[str]:
    """apt-get confined to ``state``: its own sources, lists, cache and an empty dpkg status."""
    return [
        "apt-get",
        "-q",
        "-o", f"Dir::Etc={state}/etc",
        "-o", f"Dir::Etc::SourceList={state}/etc/sources.list",
        "-o", "Dir::Etc::SourceParts=-",
        "-o", f"Dir::Etc::Parts={state}/etc/apt.conf.d",
        "-o", f"Dir::Etc::Preferences={state}/etc/preferences",
        "-o", f"Dir::Etc::PreferencesParts={state}/etc/preferences.d",
        "-o", f"Dir::State={state}",
        "-o", f"Dir::State::Lists={state}/lists",
        "-o", f"Dir::State::status={state}/status",
        "-o", f"Dir::Cache={state}/cache",
        "-o", f"APT::Architecture={ARCH}",
        "-o", f"APT::Architectures::={ARCH}",
        "-o", "APT::Install-Recommends=0",
        "-o", "Debug::NoLocking=1",
        "-o", "Acquire::Languages=none",
        "-o", "Acquire::Retries=3",
    ]  # fmt: skip


def _download(state: Path, packages: Sequence[str]) -> list[Path]:
    for d in ("lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/preferences.d"):
        (state / d).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    (state / "etc" / "sources.list").write_text(f"deb [arch={ARCH} signed-by={KEYRING}] {MIRROR} {SUITE} main\n")
    apt = _apt(state)
    _run([*apt, "update"])
    _run([*apt, "-y", "--download-only", "install", *packages])
    debs = sorted((state / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise RootError("apt downloaded no packages")
    return debs


def build_root(cache: Path = DEFAULT_CACHE, packages: Sequence[str] = DEBIAN_PACKAGES) -> Path:
    """The cached mipsel root for ``packages`` (built on first use; a few MB download). Read-only by contract."""
    key = _key(packages)
    root = cache / f"root-{key}"
    stamp = root / ".glucoagent-root.json"
    if stamp.is_file():
        return root
    with _locked(cache / ".lock"):
        if stamp.is_file():
            return root
        t0 = time.monotonic()
        work = cache / f"work-{key}"
        shutil.rmtree(work, ignore_errors=True)
        debs = _download(work / "apt", packages)
        t1 = time.monotonic()
        tree = work / "root"
        tree.mkdir(parents=True)
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
        for d in BIND_DIRS:
            (tree / d).mkdir(exist_ok=True)
        for f in (*BIND_FILES, GUEST_QEMU.lstrip("/")):
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            (tree / f).touch()
        (tree / "etc" / "nsswitch.conf").write_text(NSSWITCH)
        (tree / "root").mkdir(exist_ok=True)
        python = tree / "usr" / "bin" / "python3"
        if not python.exists():
            python.symlink_to("python3.11")
        info = {
            "arch": ARCH,
            "suite": SUITE,
            "mirror": MIRROR,
            "packages": [d.name for d in debs],
            "download_s": round(t1 - t0, 1),
            "unpack_s": round(time.monotonic() - t1, 1),
        }
        (tree / ".glucoagent-root.json").write_text(json.dumps(info, indent=1) + "\n")
        for old in cache.glob("root-*"):  # roots of other recipes or package lists
            shutil.rmtree(old, ignore_errors=True)
        tree.rename(root)
        shutil.rmtree(work, ignore_errors=True)
    return root


def root_info(root: Path) -> dict[str, Any]:
    """What :func:`build_root` recorded: packages and how long download and unpack took."""
    info: dict[str, Any] = json.loads((root / ".glucoagent-root.json").read_text())
    return info


# --- installing the package -----------------------------------------------------------------------


def _members(ipk: Path) -> dict[str, bytes]:
    with tarfile.open(ipk, "r:gz") as outer:
        out = {}
        for m in outer.getmembers():
            f = outer.extractfile(m) if m.isfile() else None
            if f is not None:
                out[m.name.removeprefix("./")] = f.read()
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def install_ipk(ipk: Path, dest: Path, base: Path | None = None) -> Path:
    """A fresh copy of ``base`` (default: :func:`build_root`) at ``dest`` with ``ipk`` installed as opkg would.

    Hard links make the copy cheap; nothing in the base is modified (the package only adds files).
    Raises RootError if the postinst fails.
    """
    base = build_root() if base is None else base
    if dest.exists():
        raise RootError(f"{dest} exists")
    shutil.copytree(base, dest, symlinks=True, copy_function=_link_or_copy)
    members = _members(ipk)
    with tarfile.open(fileobj=io.BytesIO(members["control.tar.gz"]), mode="r:gz") as tf:
        control = {
            m.name.removeprefix("./"): tf.extractfile(m).read()  # type: ignore[union-attr]
            for m in tf.getmembers()
            if m.isfile()
        }
    fields = dict(
        line.split(": ", 1) for line in control["control"].decode().splitlines() if ": " in line and line[0] != " "
    )
    pkg = fields["Package"]
    files: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(members["data.tar.gz"]), mode="r:gz") as tf:
        for m in tf.getmembers():
            path = "/" + m.name.removeprefix("./").rstrip("/")
            if m.isfile() or m.issym():
                files.append(path)
            elif path != "/":
                files.append(path + "/")
            target = dest / path.lstrip("/")
            if not m.isdir() and (target.is_symlink() or target.is_file()):
                target.unlink()  # never write through a hard link into the cached base
        tf.extractall(dest, filter="tar")
    info = dest / "usr" / "lib" / "opkg" / "info"
    info.mkdir(parents=True, exist_ok=True)
    (info / f"{pkg}.list").write_text("".join(f"{f}\n" for f in files if not f.endswith("/")))
    for name, data in control.items():
        target = info / f"{pkg}.{name}"
        target.write_bytes(data)
        target.chmod(0o755 if name in ("preinst", "postinst", "prerm", "postrm") else 0o644)
    conffiles = control.get("conffiles", b"").decode().split()
    status = [f"Package: {pkg}", f"Version: {fields['Version']}", f"Depends: {fields.get('Depends', '')}"]
    status += ["Status: install user installed", f"Architecture: {fields['Architecture']}"]
    if conffiles:
        status.append("Conffiles:")
        status += [f" {c} {hashlib.sha256((dest / c.lstrip('/')).read_bytes()).hexdigest()}" for c in conffiles]
    (dest / "usr" / "lib" / "opkg" / "status").write_text("\n".join(status) + "\n\n")
    lib = dest / "lib"
    lib.mkdir(exist_ok=True)
    shutil.copyfile(FUNCTIONS_SH, lib / "functions.sh")
    if "postinst" in control:
        run_script(dest, pkg, "postinst", "configure")
    return dest


def run_script(root: Path, pkg: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A maintainer script as opkg runs it offline: the host's /bin/sh, IPKG_INSTROOT=<root>."""
    path = root / "usr" / "lib" / "opkg" / "info" / f"{pkg}.{script}"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "IPKG_INSTROOT": str(root), "PKG_ROOT": str(root)}
    env["PKG_UPGRADE"] = "0"
    proc = subprocess.run(["/bin/sh", str(path), *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RootError(f"{pkg}.{script} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# --- running programs -----------------------------------------------------------------------------


def _resolve(root: Path, guest: PurePosixPath, depth: int = 0) -> PurePosixPath:
    """``guest`` with symlinks resolved inside ``root`` (absolute link targets are root-relative)."""
    if depth > 20:
        raise RootError(f"{guest}: too many levels of symbolic links")
    parts = guest.parts[1:]
    cur = PurePosixPath("/")
    for i, part in enumerate(parts):
        nxt = cur / part
        host = root / str(nxt).lstrip("/")
        if host.is_symlink():
            target = PurePosixPath(os.readlink(host))
            target = target if target.is_absolute() else cur / target
            rest = PurePosixPath(*parts[i + 1 :]) if i + 1 < len(parts) else None
            resolved = _resolve(root, PurePosixPath(os.path.normpath(str(target))), depth + 1)
            return _resolve(root, resolved / rest, depth + 1) if rest else resolved
        cur = nxt
    return cur


def qemu_argv(root: Path, argv: Sequence[str]) -> list[str]:
    """The guest command line qemu runs for guest ``argv`` (argv[0] an absolute path inside the root)."""
    if not argv or not argv[0].startswith("/"):
        raise RootError(f"argv[0] must be an absolute path inside the root, got {argv[:1]}")
    guest = _resolve(root, PurePosixPath(argv[0]))
    host = root / str(guest).lstrip("/")
    if not host.is_file():
        raise RootError(f"{argv[0]}: not in {root}")
    with host.open("rb") as fh:
        head = fh.read(256)
    if head.startswith(b"\x7fELF"):
        return [GUEST_QEMU, "-0", argv[0], str(guest), *argv[1:]]
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].decode().strip()
        interp, _, arg = line.partition(" ")
        return qemu_argv(root, [interp, *([arg.strip()] if arg.strip() else []), argv[0], *argv[1:]])
    raise RootError(f"{argv[0]}: neither an ELF binary nor a #! script")


# Runs on the host (python3 -I) inside the new mount namespace: bind, chroot, chdir, exec qemu.
_BOOTSTRAP = """
import os, subprocess, sys
root, qemu, cwd, dirs, files, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
def bind(src, dst):
    subprocess.run(["mount", "--rbind", src, os.path.join(root, dst)], check=True)
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
for d in dirs.split(","):
    bind("/" + d, d)
for f in files.split(","):
    if os.path.isfile("/" + f):
        bind("/" + f, f)
bind(qemu, argv[0].lstrip("/"))
os.chroot(root)
os.chdir(cwd)
os.execv(argv[0], argv)
"""


def _unshare() -> list[str]:
    if shutil.which("unshare") is None:
        raise RootError("unshare (util-linux) not installed")
    return ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])


def run_in_root(
    root: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: str = "/",
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start guest program ``argv`` of ``root`` under qemu-user and return its Popen.

    ``argv[0]`` and ``cwd`` are guest paths. The environment is :data:`GUEST_ENV` updated with
    ``env`` (the host's is not inherited). Other keyword arguments go to :class:`subprocess.Popen`
    (``stdin``/``stdout``/``stderr``, ``text``...). The Popen's pid is qemu's own (unshare and the
    bootstrap exec into it), so ``send_signal``/``terminate`` reach the guest program directly.
    Host /dev, /proc, /sys and /tmp are visible at the same paths; put files the guest must read
    (certificates, a state dir) under /tmp or into the root.
    """
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise RootError(f"{QEMU} not installed (Debian package qemu-user-static)")
    full_env = {**GUEST_ENV, **(env or {})}
    boot = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, str(root.resolve()), qemu, cwd]
    boot += [",".join(BIND_DIRS), ",".join(BIND_FILES), *qemu_argv(root, argv)]
    return subprocess.Popen([*_unshare(), "--", *boot], env=full_env, **popen)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mipsroot", description="Build the emulated mipsel root; run a command in it")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--ipk", type=Path, help="install this package into a fresh copy of the root first")
    parser.add_argument("--dest", type=Path, help="where the copy goes (default <cache>/installed)")
    parser.add_argument("command", nargs="*", help="guest command, e.g. /usr/bin/glucoagent --help")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        root = build_root(args.cache)
        print(f"root {root} ({time.monotonic() - t0:.1f} s; {root_info(root)})", file=sys.stderr)
        if args.ipk:
            dest = args.dest or args.cache / "installed"
            shutil.rmtree(dest, ignore_errors=True)
            root = install_ipk(args.ipk, dest, root)
            print(f"installed {args.ipk} into {root}", file=sys.stderr)
        if args.command:
            return run_in_root(root, args.command).wait()
    except RootError as exc:
        print(f"mipsroot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
