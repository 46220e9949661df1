"""Simulator <-> driver over a real pseudo-terminal: replay, random logs, faults, second reads."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from support.drivers import REPO
from support.drivers import PenSimulator as Simulator

from drivers.errors import DriverError, NoResponse
from drivers.novopen import PROTOCOL, Device, NoPen, PenRead
from drivers.novopen.doses import dedupe
from drivers.novopen.pmstore import DoseEntry, decode_float
from drivers.simulators.novopen import Capture, PenFaults, PenLog, random_log


def read(port: str, **kwargs: Any) -> PenRead:
    with Device(port, **kwargs) as device:
        return device.read_pen({"ABERGX": "NovoRapid", "SIM001": "Fiasp"})


def pairs(entries: tuple[DoseEntry, ...]) -> list[tuple[int, Decimal]]:
    return [(e.relative_time, Decimal(decode_float(e.units_raw))) for e in entries]  # type: ignore[arg-type]


def test_replay_of_the_captured_session_byte_for_byte(
    simulator: Simulator, novopen_vectors: Path, expected: dict[str, Any]
) -> None:
    capture = Capture.from_file(novopen_vectors / "nvp_datatest.txt")
    with simulator(capture) as (port, stats):
        result = read(port)
    assert PROTOCOL == "novopen"
    assert (result.identity.serial, result.identity.model) == ("ABERGX", "Novo Nordisk A/S NovoPen")
    assert result.identity.firmware == "01.08.01"
    assert result.complete and result.error is None and result.rejected == ()
    assert result.pen_clock_s == 6206432
    want = expected["doses_in_pen_order_newest_first"]
    assert [(d.relative_time_s, d.units) for d in result.doses] == [
        (w["relative_time_s"], Decimal(str(w["units"]))) for w in want
    ]
    assert [d.pen_clock_s - d.relative_time_s for d in result.doses] == [w["seconds_before_report"] for w in want]
    assert all(d.insulin == "NovoRapid" and d.read_at.tzinfo is not None for d in result.doses)
    assert stats.replies_left == 0 and stats.exchanges == 65  # every reply served, then the pen was gone


@pytest.mark.parametrize("seed", range(6))
def test_random_dose_logs_round_trip(simulator: Simulator, seed: int) -> None:
    rng = random.Random(seed)
    count = [0, 1, 18, 19, 36, rng.randint(37, 200)][seed]
    pen = PenLog(serial=f"RND{seed:03d}", entries=random_log(rng, count, clock_s=6_000_000), clock_s=6_000_000)
    with simulator(pen) as (port, stats):
        result = read(port)
    assert result.complete and result.error is None
    assert result.identity.serial == pen.serial
    assert [(d.relative_time_s, d.units) for d in result.doses] == pairs(pen.entries)
    assert stats.sessions == 1


def test_invalid_entries_travel_but_are_not_doses(simulator: Simulator) -> None:
    entries = (DoseEntry(900, 0xFF00001E, 0x08000000), DoseEntry(0, 0x007FFFFF, 0x04000008))
    with simulator(PenLog(entries=entries, clock_s=1_000)) as (port, _):
        result = read(port)
    assert [d.units for d in result.doses] == [Decimal("3.0")]
    assert [r.entry for r in result.rejected] == [entries[1]]


@pytest.mark.parametrize("seed", range(8))
def test_pen_removed_at_a_random_moment_then_read_again(simulator: Simulator, seed: int) -> None:
    rng = random.Random(1000 + seed)
    pen = PenLog(entries=random_log(rng, rng.randint(20, 120), clock_s=7_000_000), clock_s=7_000_000)
    with simulator(pen) as (port, clean):
        read(port)
    remove_at = rng.randint(1, clean.exchanges)  # any exchange of a full read
    seen: set[str] = set()
    stored = []
    with simulator(pen, PenFaults(remove_at=remove_at, away_polls=rng.randint(0, 2))) as (port, stats):
        try:
            first = read(port)
        except DriverError:  # cut before the pen said who it is: nothing to keep
            first = None
        if first is not None:
            assert not first.complete or remove_at > stats.exchanges - 2, "a cut read must say so"
            stored += dedupe(first.doses, seen)
        second = read(port)
    assert stats.removals == 1
    assert second.complete
    stored += dedupe(second.doses, seen)
    assert sorted((d.relative_time_s, d.units) for d in stored) == sorted(pairs(pen.entries))
    assert len({d.record_key for d in stored}) == len(pen.entries)


@pytest.mark.parametrize("corrupt", [frozenset({3}), frozenset({8, 9}), frozenset({20, 25, 40})])
def test_corrupted_reply_frames_are_nacked_and_resent(simulator: Simulator, corrupt: frozenset[int]) -> None:
    pen = PenLog(entries=random_log(random.Random(7), 40))
    with simulator(pen, PenFaults(corrupt_at=corrupt)) as (port, stats):
        result = read(port)
    assert result.complete and len(result.doses) == 40
    assert stats.corrupted == len(corrupt) and stats.nacks == len(corrupt)


def test_slow_tag_within_the_timeout_still_reads(simulator: Simulator) -> None:
    pen = PenLog(entries=random_log(random.Random(3), 20))
    with simulator(pen, PenFaults(slow_s=0.03)) as (port, stats):
        start = time.monotonic()
        result = read(port)
        elapsed = time.monotonic() - start
    assert result.complete and len(result.doses) == 20
    assert elapsed >= stats.exchanges * 0.03


def test_slow_tag_beyond_the_timeout_gives_up_without_hanging(simulator: Simulator) -> None:
    with simulator(PenLog(entries=random_log(random.Random(4), 5)), PenFaults(slow_s=0.5)) as (port, _):
        start = time.monotonic()
        with pytest.raises(NoResponse):
            read(port, response_timeout=0.2)
        assert time.monotonic() - start < 3


def test_no_pen_in_the_field(simulator: Simulator) -> None:
    with simulator(Capture(())) as (port, _):
        start = time.monotonic()
        with pytest.raises(NoPen):
            read(port, pen_wait_s=0.3)
        assert time.monotonic() - start < 2


def test_nothing_on_the_port_is_no_response(tmp_path: Path) -> None:
    from drivers.simulators.pty_link import PtyLink

    with PtyLink(tmp_path / "dead") as pty, pytest.raises(NoResponse):
        read(str(pty.link), ack_timeout=0.05)


def test_cli_simulate_serves_a_dose_file(tmp_path: Path) -> None:
    doses = tmp_path / "doses.json"
    doses.write_text('{"serial": "FILE01", "clock_s": 5000, "doses": [{"relative_time_s": 4000, "units": "7.5"}]}')
    link = tmp_path / "cli-pen"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "drivers.cli", "simulate", "novopen", "--link", str(link), "--doses", str(doses)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "simulator on" in proc.stdout.readline()
        result = read(str(link))
        assert result.identity.serial == "FILE01"
        assert [(d.relative_time_s, d.units) for d in result.doses] == [(4000, Decimal("7.5"))]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
