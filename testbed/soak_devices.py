"""The soak's simulated devices: three meters and a pen whose memories only grow, each on its own pty."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from drivers.models import GlucoseReading
from drivers.readings_json import dumps
from testbed.harness import GLUCOAGENT, spawn, stop_process

METERS = ("onetouch-ultra2", "contour-astm", "onetouch-ultraeasy")
METER_CAP = 450  # the Ultra 2 holds 500 records; stay under it
PEN_SERIAL = "SOAKPEN1"
PEN_CLOCK_S = 6_206_432


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def wait_link(link: Path, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not link.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"simulator on {link} did not come up: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)


@dataclasses.dataclass
class Meter:
    protocol: str
    link: Path
    file: Path
    log: Path
    everything: list[GlucoseReading]  # newest first; the meter holds the oldest `held`
    held: int
    proc: subprocess.Popen[bytes] | None = None

    def holding(self) -> list[GlucoseReading]:
        return self.everything[-self.held :]

    def start(self) -> None:
        self.file.write_text(dumps(self.holding()))
        argv = [GLUCOAGENT, "simulate", self.protocol, "--link", str(self.link), "--records", str(self.file)]
        self.proc = spawn([*argv, "--baud", "0"], self.log)
        wait_link(self.link, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@dataclasses.dataclass
class Pen:
    link: Path
    file: Path
    log: Path
    everything: list[tuple[int, str]]  # (relative time s, units), oldest first
    held: int
    proc: subprocess.Popen[bytes] | None = None

    def holding(self) -> list[tuple[int, str]]:
        return self.everything[: self.held]

    def start(self) -> None:
        doses = [{"relative_time_s": t, "units": u} for t, u in self.holding()]
        self.file.write_text(json.dumps({"serial": PEN_SERIAL, "clock_s": PEN_CLOCK_S, "doses": doses}))
        argv = [sys.executable, "-m", "drivers.cli", "simulate", "novopen", "--link", str(self.link)]
        self.proc = spawn([*argv, "--doses", str(self.file)], self.log)
        wait_link(self.link, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def pen_doses(rng: random.Random, count: int) -> list[tuple[int, str]]:
    """Doses an hour or more apart (no prime pairs), oldest first, all before the pen's clock."""
    out, t = [], PEN_CLOCK_S - 3_000_000
    for _ in range(count):
        t += rng.randint(3600, 7200)
        out.append((t, str(Decimal(rng.randint(10, 400)).scaleb(-1))))
    return out
