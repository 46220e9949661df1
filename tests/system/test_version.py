"""One version: pyproject.toml, agent.__version__ (what the .ipk's agent reports) and --version agree."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import agent

ROOT = Path(__file__).resolve().parents[2]


def test_versions_agree() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert agent.__version__ == declared
    out = subprocess.run([sys.executable, "-m", "agent.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"glucoagent {declared}"
