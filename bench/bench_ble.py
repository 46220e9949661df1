"""Issue 15: what Bluetooth LE costs the box.

- import time and peak RSS of a fresh interpreter importing the agent without BLE (the baseline) and with the
  BLE path (``agent.ble_source`` + ``drivers.ble.central``): a box without BLE must pay nothing, with BLE the
  goal is <= 15 MiB more;
- a complete read of 500 stored GLS records over bumble virtual controllers on a pty vs decoding the same
  500 measurements alone;
- installed bytes of the modules the BLE path loads (bumble's and pyee's, as the package would carry them) vs
  bumble's full install with what it pulls in (goal: <= 4 MB carried).
"""

from __future__ import annotations

import importlib.metadata
import json
import marshal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.table import Row

RUNS = 5
GOAL_RSS_MIB = 15.0
GOAL_BYTES = 4_000_000
_PROBE = (
    "import resource, sys, time\nt0 = time.perf_counter()\nimport {mods}\nt = time.perf_counter() - t0\n"
    "import json\nprint(json.dumps({{'s': t, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
    " 'mods': sorted(m for m in sys.modules if m.split('.')[0] in ('bumble', 'pyee', 'serial_asyncio'))}}))"
)
WITHOUT = "agent.daemon, agent.cli"
WITH = "agent.daemon, agent.cli, agent.ble_source, drivers.ble.central"


def probe(mods: str) -> tuple[float, float, list[str]]:
    """(median import seconds, median peak RSS MiB, third-party BLE modules loaded) over fresh interpreters."""
    runs = []
    for _ in range(RUNS):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE.format(mods=mods)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    return (
        statistics.median(r["s"] for r in runs),
        statistics.median(r["rss"] for r in runs) / 1024,
        list(runs[0]["mods"]),
    )


def dist_bytes(names: list[str]) -> int:
    total = 0
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            path = Path(str(f.locate()))
            if path.is_file():
                total += path.stat().st_size
    return total


# bumble's own requirements beyond this project's (cryptography and pyserial the agent has anyway).
BUMBLE_DEPS = ["bumble", "pyee", "prompt_toolkit", "wcwidth", "websockets", "click", "pyusb", "libusb-package",
               "platformdirs", "importlib_resources", "pyserial-asyncio", "libusb1"]  # fmt: skip


def bench_read_500() -> tuple[float, float]:
    from drivers.ble import gls
    from drivers.ble.central import BleCentral
    from drivers.simulators import ble_glucose

    records = ble_glucose.demo_records(500)
    raw = [ble_glucose.measurement_bytes(r) for r in records]

    def decode_all() -> None:
        for data in raw:
            gls.to_reading(gls.decode_measurement(data), None, ble_glucose.DEFAULT_ADDRESS)

    decode_s = min(_timed(decode_all) for _ in range(5))
    with tempfile.TemporaryDirectory(prefix="bench-ble-") as d:
        meter = ble_glucose.GlucoseMeter(records)
        link = str(Path(d) / "ttyBLE")
        thread, stop = ble_glucose.serve_in_thread(meter, link)
        try:
            meter.ready.wait(15)
            central = BleCentral(link, Path(d) / "bonds.json")
            central.pair(ble_glucose.DEFAULT_ADDRESS, lambda: ble_glucose.DEFAULT_PASSKEY)
            reads: list[float] = []
            for _ in range(3):
                t0 = time.perf_counter()
                read = central.read_glucose(ble_glucose.DEFAULT_ADDRESS)
                reads.append(time.perf_counter() - t0)
                if not read.complete or len(read.readings) != 500:
                    raise RuntimeError(f"incomplete read: {len(read.readings)} records, {read.error}")
        finally:
            stop.set()
            thread.join(10)
    return min(reads), decode_s


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def run() -> list[Row]:
    base_s, base_rss, base_mods = probe(WITHOUT)
    ble_s, ble_rss, ble_mods = probe(WITH)
    from openwrt.package import ble_files

    # What the BLE box installs: the carried sources (openwrt/package.py BLE_MODULES) and their bytecode.
    carried = sum(len(data) + (len(marshal.dumps(compile(data, rel, "exec"))) + 16 if rel.endswith(".py") else 0)
                  for rel, data in ble_files())  # fmt: skip
    full = dist_bytes(BUMBLE_DEPS)
    read_s, decode_s = bench_read_500()
    return [
        Row("BLE modules (bumble, pyee) loaded by the agent without BLE", len(base_mods), None, "0", not base_mods),
        Row("import time, agent with BLE path (s)", ble_s, base_s, "report", None, "agent without BLE"),
        Row(
            "peak RSS, agent with BLE path (MiB)",
            ble_rss,
            base_rss,
            f"<= +{GOAL_RSS_MIB:.0f} MiB",
            ble_rss - base_rss <= GOAL_RSS_MIB,
            "agent without BLE",
            note=f"{len(ble_mods)} modules",
        ),
        Row(
            "complete GLS read of 500 records over the virtual link (s)",
            read_s,
            decode_s,
            "report",
            None,
            "decode of the same 500 alone",
        ),
        Row(
            "installed bytes of the BLE modules carried (source + bytecode)",
            carried,
            full,
            f"<= {GOAL_BYTES:,} B",
            carried <= GOAL_BYTES,
            "bumble full install + deps",
        ),
    ]


if __name__ == "__main__":
    threading.excepthook = lambda args: None
    from bench.run import table

    print(table(run()))
