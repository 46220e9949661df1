"""Fixtures for the OpenWrt packaging tests: the package built once per session, OpenWrt's own tools.

``openwrt_tools``: the real uci, opkg-lede, apk-tools, jshn and OpenWrt's rc.common / functions.sh /
service.sh / procd.sh, built by ``openwrt/hosttools.py`` from ``../shared/openwrt-tools``. ``make test``
builds them and sets GLUCOAGENT_OPENWRT_TOOLS to their directory; where the sources are absent it says
so in one line and leaves the variable unset, and every test using the fixture is deselected (reported,
not skipped). Set but pointing at an incomplete tool set: the session stops with an error.
To run these tests by hand: ``GLUCOAGENT_OPENWRT_TOOLS=$(.venv/bin/python -m openwrt.hosttools --src
/path/to/shared/openwrt-tools) .venv/bin/pytest tests/openwrt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # openwrt/ is a build tool, not an installed package

from openwrt import hosttools  # noqa: E402
from openwrt.build_ipk import build_ipk  # noqa: E402

TOOLS_ENV = "GLUCOAGENT_OPENWRT_TOOLS"
HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    root = os.environ.get(TOOLS_ENV)
    if root:
        try:
            hosttools.load(Path(root))
        except hosttools.ToolsError as exc:
            raise pytest.UsageError(f"{TOOLS_ENV} is set but {exc}") from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(TOOLS_ENV):
        return
    needs = [i for i in items if "openwrt_tools" in getattr(i, "fixturenames", ())]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [i for i in items if i not in needs]
        config.stash[_DESELECTED] = len(needs)


_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    n = config.stash.get(_DESELECTED, 0)
    if n:
        terminalreporter.write_line(f"OpenWrt tools suite: {n} tests deselected ({TOOLS_ENV} unset)")


@pytest.fixture(scope="session")
def openwrt_tools() -> hosttools.Tools:
    root = os.environ.get(TOOLS_ENV)
    if not root:  # deselected above; reaching here means a plugin re-selected it
        pytest.fail(f"{TOOLS_ENV} is unset: the OpenWrt tools were not built")
    return hosttools.load(Path(root))


@pytest.fixture(scope="session")
def ipk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ipk(tmp_path_factory.mktemp("ipk"))
