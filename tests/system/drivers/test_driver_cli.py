"""simulate / decode commands, readings JSON, registry and probing: real processes and real ptys."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.drivers import REPO

from drivers import readings_json
from drivers.errors import NoResponse, UnknownProtocol
from drivers.reader import read_meter
from drivers.registry import METERS, open_device, probe
from drivers.simulators.records import random_records

CLI = [sys.executable, "-m", "drivers.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_decode_json_of_the_500_record_dump(vectors: Any) -> None:
    capture = vectors.path("onetouch-ultra2", "insulaudit-dmp-500.txt")
    expected = vectors.json("onetouch-ultra2", "insulaudit-dmp-500.expected.json")
    out = run_cli("decode", "--protocol", "onetouch-ultra2", str(capture), "--json")
    assert out.returncode == 0, out.stderr
    readings = [readings_json.from_json(d) for d in json.loads(out.stdout)]
    assert [(r.meter_time.isoformat(), r.value_mgdl) for r in readings] == [
        (e["timestamp_local"], e["value_mgdl"]) for e in expected["records"]
    ]


def test_decode_reports_rejected_units_with_exit_code(tmp_path: Path) -> None:
    capture = tmp_path / "cap.bin"
    capture.write_bytes(b"\x025L|1||N\r\x0385\r\n")
    out = run_cli("decode", "--protocol", "contour-astm", str(capture), "--json")
    assert out.returncode == 20 and json.loads(out.stdout) == [] and "InvalidChecksum" in out.stderr


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    out = run_cli("decode", "--protocol", "contour-astm", str(tmp_path / "missing"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and out.stderr.startswith("glucoagent: error:")
    bad = tmp_path / "records.json"
    bad.write_text('[{"meter_time": "2020-01-01T00:00:00+01:00", "value_mgdl": 100}]')
    out = run_cli("simulate", "onetouch-ultra2", "--link", str(tmp_path / "tty"), "--records", str(bad))
    assert out.returncode == 10 and "no zone" in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize("protocol", sorted(METERS))
def test_simulate_command_serves_records_file_until_sigterm(protocol: str, tmp_path: Path) -> None:
    records = random_records(protocol, 8, seed=4)
    records_file = tmp_path / "records.json"
    records_file.write_text(readings_json.dumps(records))
    link = tmp_path / "ttyMETER"
    proc = subprocess.Popen(
        [*CLI, "simulate", protocol, "--link", str(link), "--records", str(records_file), "--baud", "0"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not link.is_symlink():
            assert proc.poll() is None and time.monotonic() < deadline, "simulator did not come up"
            time.sleep(0.02)
        result = read_meter(str(link), None, wall_clock=dt.datetime.now)
        assert result.complete and result.identity.protocol == protocol
        assert [r.with_offset(None) for r in result.readings] == records
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert not link.exists() and not link.is_symlink()


@pytest.mark.parametrize("protocol", sorted(METERS))
def test_probe_finds_each_protocol_without_side_effects(protocol: str, sim: Any) -> None:
    records = random_records(protocol, 4, seed=3)
    with sim(protocol, records) as (link, simulator):
        assert probe(link) == protocol
        assert probe(link) == protocol  # probing twice changes nothing
        read = read_meter(link, None, wall_clock=dt.datetime.now)
    assert read.complete and [r.with_offset(None) for r in read.readings] == records
    assert simulator.records == records  # memory untouched


def test_probe_of_a_silent_port_is_none(scripted: Any) -> None:
    assert probe(scripted.url, timeout=0.1) is None
    with pytest.raises(NoResponse):
        read_meter(scripted.url, None, wall_clock=dt.datetime.now)


def test_unknown_protocol_and_missing_port() -> None:
    with pytest.raises(UnknownProtocol):
        open_device("freestyle", "loop://")
    from drivers.errors import PortError

    with pytest.raises(PortError):
        read_meter("/dev/does-not-exist", "onetouch-ultra2", wall_clock=dt.datetime.now)


@pytest.mark.parametrize(
    ("protocol", "flags", "named"),
    [
        ("novopen", ["--noise", "0.1", "--records", "x.json"], "--records, --noise"),
        ("onetouch-ultra2", ["--doses", "x.json"], "--doses"),
        ("contour-astm", ["--corrupt-at", "3"], "--corrupt-at"),
    ],
)
def test_simulate_refuses_flags_of_the_other_kind(protocol: str, flags: list[str], named: str, tmp_path: Path) -> None:
    link = tmp_path / "tty"
    out = run_cli("simulate", protocol, "--link", str(link), *flags)
    assert out.returncode == 10 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"glucoagent: error: simulate {protocol}: {named} does not apply")
    assert not link.exists()


def test_simulate_pen_with_both_sources_or_a_bad_file_is_one_line(tmp_path: Path) -> None:
    link = tmp_path / "tty"
    out = run_cli("simulate", "novopen", "--link", str(link), "--doses", "a.json", "--capture", "b.txt")
    assert out.returncode == 10 and "either --doses or --capture" in out.stderr and out.stderr.count("\n") == 1
    out = run_cli("simulate", "novopen", "--link", str(link), "--doses", str(tmp_path / "missing.json"))
    assert out.returncode == 10 and out.stderr.startswith("glucoagent: error: simulate novopen:"), out.stderr
    assert out.stderr.count("\n") == 1 and not link.exists()


def test_decode_of_a_pen_capture_prints_one_line_per_entry(vectors: Any) -> None:
    out = run_cli("decode", "--protocol", "novopen", str(vectors.path("novopen", "nvp_datatest.txt")))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("pen ") and len(lines) == 1 + 96
    assert sum(" U" in line for line in lines[1:]) + sum("rejected:" in line for line in lines[1:]) == 96
