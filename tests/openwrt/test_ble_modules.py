"""Which bumble modules a BLE box carries (openwrt/package.py BLE_MODULES): every module a real scan, pairing
and read loads, nothing of bumble's apps/USB/websockets, within 4 MB installed; the glucoagent package itself
carries none of it (a box without BLE pays nothing)."""

from __future__ import annotations

import json
import marshal
import subprocess
import sys
from pathlib import Path

from openwrt import package as B

REPO = Path(__file__).resolve().parents[2]
GLUCOAGENT = str(Path(sys.executable).parent / "glucoagent")
_SESSION = """
import json, sys
from drivers.ble.central import BleCentral
c = BleCentral(sys.argv[1], sys.argv[2], connect_timeout=5.0)
assert c.scan(2.0)
c.pair("C4:10:00:00:15:01", lambda: 123456)  # the simulator's defaults (importing it would load bumble.controller)
assert c.read_glucose("C4:10:00:00:15:01").complete
c.read_bp  # noqa: B018
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('bumble', 'pyee', 'serial_asyncio'))))
"""


def test_the_carried_modules_are_exactly_what_a_ble_session_loads(tmp_path: Path) -> None:
    link = tmp_path / "ttyBLE"
    sim = subprocess.Popen([GLUCOAGENT, "simulate", "ble-glucose", "--link", str(link), "--count", "5"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(150):
            if link.exists():
                break
            subprocess.run(["sleep", "0.1"], check=True)
        out = subprocess.run([sys.executable, "-c", _SESSION, str(link), str(tmp_path / "bonds.json")],
                             capture_output=True, text=True, timeout=120, cwd=REPO, check=False)  # fmt: skip
    finally:
        sim.terminate()
        sim.wait(10)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout))
    carried = {m for modules in B.BLE_MODULES.values() for m in modules}
    assert loaded == carried, (sorted(loaded - carried), sorted(carried - loaded))
    assert not {m for m in loaded if m.startswith(("bumble.apps", "bumble.transport.usb", "bumble.controller"))}


def test_carried_modules_with_their_bytecode_fit_in_4_mb() -> None:
    files = B.ble_files()
    source = sum(len(data) for _, data in files)
    bytecode = sum(len(marshal.dumps(compile(data, rel, "exec"))) + 16 for rel, data in files if rel.endswith(".py"))
    assert source + bytecode <= 4_000_000, (source, bytecode)
    assert any("bumble" in rel and "licen" in rel.lower() for rel, _ in files)


def test_the_glucoagent_package_carries_no_ble_stack() -> None:
    paths = [e.path for e in B.data_entries()]
    assert not [p for p in paths if "/bumble/" in p or "/pyee/" in p or "serial_asyncio" in p]
    assert any(p.endswith("/drivers/ble/central.py") for p in paths)  # our own code is there, inert without BLE
