"""Issue 17: what a duty-cycled box costs per simulated day vs the always-on link, both run by
testbed/duty.py's ``run_duty_box`` in the same run (time compressed: 1 simulated hour = 2 s; bytes
through a counting proxy, TLS included). Connections and bytes follow the wake-ups, which the
compression keeps; CPU and wake-ups of idle loops follow real time, so they are not per-day figures."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.table import Row
from testbed.duty import DutyFigures, run_duty_box

HOURS = 24.0


def _day(link: str) -> DutyFigures:
    with tempfile.TemporaryDirectory(prefix=f"bench-duty-{link}-") as d:
        return run_duty_box(Path(d), HOURS, link=link)


def run() -> list[Row]:
    always = _day("always")
    duty = _day("duty")
    base = "always-on link, same day"
    return [
        Row(
            "duty mode, 24 simulated h, wake hourly: TCP connections",
            duty.connects,
            always.connects,
            "report",
            None,
            base,
        ),
        Row("duty mode, 24 simulated h: bytes sent (TLS incl.)", duty.bytes_up, always.bytes_up, "report", None, base),
        Row(
            "duty mode, 24 simulated h: bytes received (TLS incl.)",
            duty.bytes_down,
            always.bytes_down,
            "report",
            None,
            base,
        ),
        Row("duty mode, 24 simulated h (48 s real): agent CPU s", duty.cpu_s, always.cpu_s, "report", None, base),
        Row(
            "duty mode, 24 simulated h (48 s real): context switches",
            duty.context_switches,
            always.context_switches,
            "report",
            None,
            base,
        ),
    ]
