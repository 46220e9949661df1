"""Duty mode: 24 simulated hours (one simulated hour = 2 real seconds; the reading interval and
``agent.wake_interval_s`` scaled alike, see testbed/duty.py), a reading every 4 hours, commands sent
while the box sleeps: every reading arrives once, every command runs once when the box wakes, and the
link was down between wake-ups. The idle figures of the run are printed (``pytest -s``)."""

from __future__ import annotations

from pathlib import Path

from drivers.simulators.records import random_records
from testbed.duty import run_duty_box


def test_a_duty_box_over_24_simulated_hours_loses_nothing_and_sleeps(tmp_path: Path) -> None:
    figures = run_duty_box(tmp_path, hours=24, hour_s=2.0, reading_every_h=4, wake_every_h=1, commands_while_asleep=3)
    print(figures)
    expected = [(m.meter_time.isoformat(), m.value_mgdl) for m in random_records("onetouch-ultra2", 6, seed=24)]
    assert sorted(figures.readings_stored) == sorted(expected)  # every reading, once
    assert len(figures.commands_sent) == 3
    assert all(n == 1 for n in figures.command_runs.values()), figures.command_runs  # every command, once
    assert all(status == "ok" for status in figures.command_results.values()), figures.command_results
    # The link came up for wake-ups and readings, not for good: about one connection per simulated hour
    # (24 wake-ups, plus one per reading and per command result at most), each closed again.
    assert 12 <= figures.connects <= 24 + 6 + 3 + 5, figures
