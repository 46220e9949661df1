"""The package on an emulated MIPS little-endian device: Debian bookworm mipsel + qemu-mipsel-static.

The root is built once and cached under build/mipsroot (about 10 s with a warm network, 16 MB of
.debs); each test module gets its own copy with the .ipk installed and its postinst run.
Run a command in it with ``openwrt.mipsroot.run_in_root(root, argv, env)``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from openwrt import build_ipk as B
from openwrt.mipsroot import build_root, install_ipk, root_info, run_in_root, run_script

pytestmark = pytest.mark.slow
GUEST_TIMEOUT_S = 180  # python under qemu-user: ~1 s to start, a few s to import cryptography


@pytest.fixture(scope="module")
def base_root() -> Path:
    t0 = time.monotonic()
    root = build_root()
    info = root_info(root)
    print(f"mipsel root: {time.monotonic() - t0:.1f} s here; built in {info['download_s'] + info['unpack_s']:.1f} s")
    return root


@pytest.fixture(scope="module")
def root(base_root: Path, ipk: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_ipk(ipk, tmp_path_factory.mktemp("device") / "root", base_root)


def guest(root: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = run_in_root(root, list(argv), env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=GUEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{argv} timed out under qemu: {err[-2000:]}")
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def test_root_is_mips_little_endian(base_root: Path) -> None:
    elf = (base_root / "usr" / "bin" / "python3.11").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF"
    assert (elf[4], elf[5]) == (1, 1)  # 32-bit, little-endian
    assert int.from_bytes(elf[18:20], "little") == 8  # EM_MIPS
    info = root_info(base_root)
    assert any(p.startswith("python3-cryptography_") for p in info["packages"])
    assert any(p.startswith("libsqlite3-0_") for p in info["packages"])


def test_guest_python_runs_emulated(root: Path) -> None:
    r = guest(
        root, "/usr/bin/python3", "-c", "import platform, sys; print(platform.machine(), sys.byteorder, sys.version)"
    )
    assert r.returncode == 0, r.stderr
    machine, order, version = r.stdout.split(" ", 2)
    assert (machine, order) == ("mips", "little")
    assert version.startswith("3.11.")


def test_postinst_enabled_the_service_and_made_the_state_dir(root: Path) -> None:
    rcd = root / "etc" / "rc.d"
    for link in ("S95glucoagent", "K10glucoagent"):
        assert (rcd / link).is_symlink()
        assert str((rcd / link).readlink()) == "../init.d/glucoagent"
    assert ((root / "etc" / "glucoagent").stat().st_mode & 0o777) == 0o700
    listed = (root / "usr" / "lib" / "opkg" / "info" / "glucoagent.list").read_text().split()
    assert B.INIT in listed and B.UCI_CONFIG in listed


IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    sys.path[:0] = ["/usr/lib/glucoagent", "/usr/lib/glucoagent/vendor"]
    import agent, drivers
    names = ["cbor2", "paho.mqtt.client", "tenacity", "cryptography", "serial", "sqlite3", "ssl"]
    for pkg in (agent, drivers):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    files = {}
    for name in names:
        try:
            files[name] = importlib.import_module(name).__file__
        except ModuleNotFoundError as exc:  # bumble ships in the glucoagent-ble add-on, not in this package
            if not (exc.name or "").startswith(("bumble", "pyee", "serial_asyncio")):
                raise
            files[name] = "needs glucoagent-ble"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"reading"), b"reading")
    import cbor2
    assert cbor2.loads(cbor2.dumps({"mg/dL": 104})) == {"mg/dL": 104}
    try:
        import _cbor2
        files["_cbor2"] = _cbor2.__file__
    except ImportError:
        pass
    print(json.dumps(files))
    """
)


def _pyc_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (root / "usr" / "lib" / "glucoagent").rglob("*.pyc")
    }


def test_every_shipped_module_imports_on_the_device(root: Path) -> None:
    before = _pyc_digests(root)
    r = guest(root, "/usr/bin/python3", "-c", IMPORT_ALL)
    assert r.returncode == 0, r.stderr[-3000:]
    files: dict[str, str] = json.loads(r.stdout.splitlines()[-1])
    assert "_cbor2" not in files  # the pure-Python codec, no compiled extension
    # exactly the BLE central and the BLE simulators need the add-on; the agent's BLE source imports it lazily
    assert sorted(n for n, f in files.items() if f == "needs glucoagent-ble") == [
        "drivers.ble.central", "drivers.simulators.ble_bp", "drivers.simulators.ble_glucose",
        "drivers.simulators.ble_radio",
    ]  # fmt: skip
    assert len([n for n in files if n.startswith(("agent.", "drivers."))]) > 20
    for name, path in files.items():
        top = name.split(".")[0]
        if path == "needs glucoagent-ble":
            continue
        if top in ("agent", "drivers"):
            assert path.startswith(f"/usr/lib/glucoagent/{top}/"), (name, path)
        elif top in ("cbor2", "paho", "tenacity"):
            assert path.startswith("/usr/lib/glucoagent/vendor/"), (name, path)
        elif top in ("cryptography", "serial"):
            assert path.startswith("/usr/lib/python3/dist-packages/"), (name, path)
    # the shipped bytecode was valid for the device's interpreter: nothing was recompiled or rewritten
    assert _pyc_digests(root) == before


def test_glucoagent_help_and_version(root: Path) -> None:
    r = guest(root, "/usr/bin/glucoagent", "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run" in r.stdout and "hotplug" in r.stdout
    r = guest(root, "/usr/bin/glucoagent", "--version")
    assert r.returncode == 0, r.stderr[-3000:]
    assert B.package_version().split("-")[0] in r.stdout + r.stderr


LOAD_CONFIG = textwrap.dedent(
    """
    import sys
    sys.path[:0] = ["/usr/lib/glucoagent", "/usr/lib/glucoagent/vendor"]
    from pathlib import Path
    from agent.config import load_config
    from agent.errors import ConfigError
    try:
        cfg = load_config(Path(sys.argv[1]))
    except ConfigError as exc:
        print("ConfigError:", exc)
    else:
        print(cfg.mqtt.keepalive, [p.port for p in cfg.ports])
    """
)


def test_device_reads_its_uci_config_and_names_a_bad_line(root: Path, tmp_path: Path) -> None:
    r = guest(root, "/usr/bin/python3", "-c", LOAD_CONFIG, B.UCI_CONFIG)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "30 ['/dev/ttyUSB0']"
    bad = tmp_path / "glucoagent"  # host /tmp is visible in the guest at the same path
    bad.write_text("config mqtt 'mqtt'\n\toption keepalive '30\n")
    r = guest(root, "/usr/bin/python3", "-c", LOAD_CONFIG, str(bad))
    assert r.stdout.strip() == f"ConfigError: {bad}:2: option 'keepalive': EOF with unterminated ' (uci refuses this file)"


def test_prerm_disables_the_service(base_root: Path, ipk: Path, tmp_path: Path) -> None:
    root = install_ipk(ipk, tmp_path / "root", base_root)
    assert (root / "etc" / "rc.d" / "S95glucoagent").is_symlink()
    run_script(root, "glucoagent", "prerm", "remove")
    assert not list((root / "etc" / "rc.d").iterdir())
    # the cached base was not touched by either install
    assert not (base_root / "usr" / "lib" / "glucoagent").exists()
    assert not (base_root / "etc" / "rc.d").exists()
