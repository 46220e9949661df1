"""``glucoagent simulate ble-glucose|ble-bp`` as a process, and the serial path never loading bumble."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.ble.central import BleCentral
from drivers.simulators import ble_bp, ble_glucose

REPO = Path(__file__).resolve().parents[4]


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not path.is_symlink():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "simulator did not publish its link"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("protocol", "address", "passkey", "count"),
    [("ble-glucose", ble_glucose.DEFAULT_ADDRESS, 222333, 7), ("ble-bp", ble_bp.DEFAULT_ADDRESS, 444555, 6)],
)
def test_simulate_ble_process(tmp_path: Path, protocol: str, address: str, passkey: int, count: int) -> None:
    link = tmp_path / "ttyBLE"
    proc = subprocess.Popen(
        [sys.executable, "-m", "drivers.cli", "simulate", protocol, "--link", str(link), "--count", str(count),
         "--passkey", str(passkey), "--duplicate-every", "2"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(link, proc)
        central = BleCentral(str(link), tmp_path / "bonds.json")
        central.pair(address, lambda: passkey)
        read = central.read_glucose(address) if protocol == "ble-glucose" else central.read_bp(address, quiet_s=1.0)
        assert read.complete and len(read.readings) == count
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"simulating {protocol} {address} ({count} records, passkey {passkey})" in err
    assert not link.exists() and not link.is_symlink()


def test_ble_flags_are_refused_where_they_do_not_apply(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "drivers.cli", "simulate", *args, "--link", str(tmp_path / "t")],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    bp = run("ble-bp", "--racp-error", "3")
    assert bp.returncode == 10 and bp.stderr.strip() == "glucoagent: error: simulate ble-bp: --racp-error does not apply to ble-bp"
    serial = run("onetouch-ultra2", "--passkey", "1")
    assert serial.returncode == 10 and "--passkey does not apply" in serial.stderr
    both = run("ble-glucose", "--passkey", "1", "--just-works")
    assert both.returncode == 10 and "either --passkey or --just-works" in both.stderr


def test_the_serial_path_never_imports_bumble() -> None:
    code = (
        "import sys, drivers.registry, drivers.cli, drivers.reader, drivers.simulators.run, drivers.ble.gls, "
        "drivers.ble.bls; print(sorted(m for m in sys.modules if m.split('.')[0] == 'bumble'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
