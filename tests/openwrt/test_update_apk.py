"""Issue 16 on OpenWrt 25.12+: the update flow with the real apk (apk-tools 3, built from ../shared/openwrt-tools
by openwrt/hosttools.py) in an offline root, end to end: the real broker (TLS, ACLs) and cloud; the agent that
runs is the one apk installed in the root (its launcher and code), started and respawned as procd does; the
installed shell watchdog run as cron does (testbed/demo_update.py, which `make demo-update` runs on opkg).

In one box's life: release r2 passes its health gate; a forged release and an .ipk release are refused with
nothing changed; release r3, which crashes at every start, is rolled back by the watchdog (apk downgrading to
the kept r2) and reported by r2; a meter read throughout loses and doubles nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.update.pkgdb import APK, installed_version
from openwrt import hosttools
from openwrt.package import describe
from testbed.demo_update import run_update_demo


def test_apk_good_update_forged_and_wrong_format_refused_broken_rolled_back(
    openwrt_tools: hosttools.Tools, tmp_path: Path
) -> None:
    lines: list[str] = []
    f = run_update_demo(tmp_path, openwrt_tools, fmt="apk", say=lines.append)
    log = "\n".join(lines)
    v1 = describe()
    r1, r2, r3 = (dataclasses.replace(v1, release=v1.release + i).apk_version for i in range(3))
    assert f.tool == "apk" and f.versions == [r1, r2, r3], log
    assert [(status, code) for _, status, code in f.outcomes] == [
        ("ok", "updated"),
        ("refused", "bad_signature"),
        ("refused", "wrong_format"),
        ("failed", "rolled_back"),
    ], log
    assert f.running == r2, log  # apk's database after the rollback (the baseline install came after)
    assert "glucoagent-update-watchdog: glucoagent rolled back from " + r3 + " to " + r2 in log
    assert "ModuleNotFoundError" in log  # r3 really ran and crashed, more than once (the demo checks it)
    # apk's own database in the root, as the agent reads it: the baseline step put r3 back in after the run
    db = tmp_path / "box" / "root" / APK.status_file.relative_to("/")
    assert installed_version(db, "glucoagent") == r3
    assert f.expected >= 10 and f.delivered == f.expected, log
    assert (f.lost, f.duplicates) == (0, 0), log
