"""The OpenWrt tool set the real-tools tests use: each binary runs as built, from its cache directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

from openwrt import hosttools


def _run(tools: hosttools.Tools, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), env=tools.env, capture_output=True, text=True, timeout=30, check=False)


def test_each_tool_runs(openwrt_tools: hosttools.Tools) -> None:
    assert "apk-tools 3.0.6" in _run(openwrt_tools, str(openwrt_tools.apk), "--version").stdout
    assert "opkg version" in _run(openwrt_tools, str(openwrt_tools.opkg), "--version").stdout
    out = _run(openwrt_tools, str(openwrt_tools.jshn), "-r", '{"a": 1}').stdout
    assert "json_add_int 'a' 1;" in out


def test_uci_reads_a_file(openwrt_tools: hosttools.Tools, tmp_path: Path) -> None:
    conf = tmp_path
    (conf / "t").write_text("config agent 'main'\n\toption x '1'\n")
    res = _run(openwrt_tools, str(openwrt_tools.uci), "-c", str(conf), "show", "t")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["t.main=agent", "t.main.x='1'"]


def test_the_cache_is_reused(openwrt_tools: hosttools.Tools) -> None:
    """``build`` finds the complete directory and returns it without building again (the marker is kept)."""
    marker = openwrt_tools.root / ".complete"
    before = marker.stat().st_mtime_ns
    src = marker.read_text().removeprefix("sources ").strip()
    assert hosttools.build(Path(src)) == openwrt_tools.root
    assert marker.stat().st_mtime_ns == before
