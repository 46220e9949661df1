"""Fixtures for the OpenWrt packaging tests: the package built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # openwrt/ is a build tool, not an installed package

from openwrt.build_ipk import build_ipk  # noqa: E402


@pytest.fixture(scope="session")
def ipk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ipk(tmp_path_factory.mktemp("ipk"))
