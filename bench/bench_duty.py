"""Issue 17: what a duty-cycled box costs per simulated day vs the always-on link, both run by
testbed/duty.py's ``run_duty_box`` in the same run (time compressed: 1 simulated hour = 2 s; bytes
through a counting proxy, TLS included). Connections and bytes follow the wake-ups, which the
compression keeps; CPU and wake-ups of idle loops follow real time, so they are not per-day figures.
Those are measured apart, per real hour, by ``run_idle_box``: each link left alone for IDLE_WINDOW_S
with the defaults a box runs with."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.table import Row
from testbed.duty import DutyFigures, IdleFigures, run_duty_box, run_idle_box

HOURS = 24.0
IDLE_WINDOW_S = 60.0


def _day(link: str) -> DutyFigures:
    with tempfile.TemporaryDirectory(prefix=f"bench-duty-{link}-") as d:
        return run_duty_box(Path(d), HOURS, link=link)


def _idle(link: str) -> IdleFigures:
    with tempfile.TemporaryDirectory(prefix=f"bench-idle-{link}-") as d:
        return run_idle_box(Path(d), link, IDLE_WINDOW_S)


def run() -> list[Row]:
    always = _day("always")
    duty = _day("duty")
    idle_always, idle_duty = _idle("always"), _idle("duty")
    base = "always-on link, same day"
    idle_base = "always-on link, idle"
    return [
        Row(
            "idle per hour, duty link asleep: agent CPU s",
            idle_duty.per_hour(idle_duty.cpu_s),
            idle_always.per_hour(idle_always.cpu_s),
            "report",
            None,
            idle_base,
        ),
        Row(
            "idle per hour, duty link asleep: wake-ups (voluntary context switches)",
            idle_duty.per_hour(idle_duty.wakeups),
            idle_always.per_hour(idle_always.wakeups),
            "report",
            None,
            idle_base,
        ),
        Row(
            "idle per hour, duty link asleep: bytes sent (TLS incl.)",
            idle_duty.per_hour(idle_duty.bytes_up),
            idle_always.per_hour(idle_always.bytes_up),
            "report",
            None,
            idle_base,
        ),
        Row(
            "idle per hour, duty link asleep: bytes received (TLS incl.)",
            idle_duty.per_hour(idle_duty.bytes_down),
            idle_always.per_hour(idle_always.bytes_down),
            "report",
            None,
            idle_base,
        ),
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
        Row(
            "duty mode, compressed day: agent CPU s per real hour",
            duty.cpu_s * 3600 / duty.real_s,
            always.cpu_s * 3600 / always.real_s,
            "report",
            None,
            base,
        ),
        Row(
            "duty mode, compressed day: wake-ups per real hour (voluntary context switches)",
            duty.wakeups * 3600 / duty.real_s,
            always.wakeups * 3600 / always.real_s,
            "report",
            None,
            base,
        ),
    ]
