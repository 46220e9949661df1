"""The update tests' "box" (an offline OpenWrt root with glucoagent installed by the real opkg or apk) lives in
testbed/update_box.py, where `make demo-update` and the bench use it too; the tests' names for it."""

from __future__ import annotations

from testbed.update_box import NAME, WATCHDOG, BoxRoot, apk_root, dep_apks, dep_ipks, opkg_root, stub_apk

OpkgRoot = BoxRoot

__all__ = ["NAME", "WATCHDOG", "BoxRoot", "OpkgRoot", "apk_root", "dep_apks", "dep_ipks", "opkg_root", "stub_apk"]
