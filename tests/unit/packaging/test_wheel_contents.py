"""The installed package is the product and the reference cloud, never the test rig: the wheel that
`pip install .` would install holds agent/, drivers/, backend/ only (issue 13: `testbed/` is neither
installed nor shipped). Built for real by pip from a copy of the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RIG = ("harness", "faultproxy", "clockshim", "soak", "demo", "rogue_ca", "client_certs")


def test_wheel_holds_no_test_rig(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("glucoagent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"agent", "drivers", "backend"}, tops
    assert "backend/service.py" in names  # the cloud is there: the check looks at the right list
    rig = [n for n in names if n.startswith("testbed/") or Path(n).stem in RIG]
    assert rig == [], rig
