"""Issue 16: how long a broken release keeps the box off its previous version. testbed/demo_update.py's
``run_update_demo`` (the box installed by OpenWrt's real opkg, the installed agent and watchdog, procd and cron
played by the rig, a meter read throughout) is run once; from it, in the same run:

* the rollback: the broken release's install (its pending marker) to the previous version running again and
  its ``rolled_back`` result stored at the cloud, against a good update of the same box (install to the new
  version's gate passed and reported). Dominated by ``update.gate_s`` (30 s, the smallest allowed) by design;
* what the rollback adds after the gate's deadline (waiting for the watchdog's next run, its reinstall,
  the restart, the report), against a plain ``opkg install`` of a package of the same size into the same root
  (release 3 over release 2 again, the agent stopped).

On a box the watchdog runs every minute from cron, here every CRON_S seconds: the total there is
``update.gate_s`` + up to 60 s + the same tail.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.table import Row
from openwrt import hosttools
from testbed.demo_update import GATE_S, DemoFailed, run_update_demo

CRON_S = 5.0
TOOLS_SRC = Path("../shared/openwrt-tools")


def _tools() -> hosttools.Tools:
    built = os.environ.get("GLUCOAGENT_OPENWRT_TOOLS")
    return hosttools.load(Path(built) if built else hosttools.build(TOOLS_SRC))


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-update-") as d:
        f = run_update_demo(Path(d), _tools(), cron_s=CRON_S, say=lambda _line: None)
    if f.lost or f.duplicates:
        raise DemoFailed(f"readings lost {f.lost}, duplicated {f.duplicates} across the updates")
    tail_goal = CRON_S + 5.0
    return [
        Row(
            f"update rollback: broken release installed -> previous version running and reporting (s; gate {GATE_S} s, "
            f"watchdog every {CRON_S:g} s)",
            f.rollback_s,
            f.good_update_s,
            f"<= {GATE_S + tail_goal:g} s",
            f.rollback_s <= GATE_S + tail_goal,
            "good update: installed -> gate passed, reported",
        ),
        Row(
            "update rollback after the gate deadline: watchdog wait, reinstall, restart, report (s)",
            f.deadline_to_reported_s,
            f.reinstall_s,
            f"<= {tail_goal:g} s",
            f.deadline_to_reported_s <= tail_goal,
            "plain opkg install of the package",
        ),
    ]
