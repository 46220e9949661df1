"""Issue 9: resident memory of the running agent at steady state vs a bare interpreter
that only imports the same libraries; start-up time to the first publish."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import rss_kib
from bench.table import Row
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config

# The modules a running agent has loaded (its own packages excepted) are "the same libraries".
_LIST_LIBRARIES = (
    "import sys, agent.cli, agent.daemon, drivers.reader, drivers.registry, drivers.novopen\n"
    "for n in ('onetouch_ultra2', 'contour_astm', 'onetouch_ultraeasy'): __import__('drivers.' + n)\n"
    "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] not in ('agent', 'drivers', '__main__'))))"
)


def _bare_rss() -> float:
    libraries = subprocess.run([sys.executable, "-c", _LIST_LIBRARIES], capture_output=True, text=True, check=True)
    code = (
        f"import importlib, contextlib\nfor m in {libraries.stdout.split()!r}:\n"
        "    with contextlib.suppress(Exception): importlib.import_module(m)\n"
        "import time; time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(2.0)
        return rss_kib(proc.pid) / 1024
    finally:
        proc.kill()
        proc.wait()


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as d, LocalSystem(Path(d) / "sys") as system:
        state = system.device_dir()
        system.provision(state)
        records = Path(d) / "meter.json"
        records.write_text(dumps(random_records("onetouch-ultra2", 50, seed=8)))
        link = Path(d) / "ttyMEM"
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        config = device_config(
            state / "glucoagent.uci", [(str(link), "onetouch-ultra2")], agent={"health_interval_s": "10"}
        )
        t0 = time.monotonic()
        agent = system.start_agent(state, config)
        system.wait_for(lambda: len(system.db.records(kind="reading")) > 0, timeout=60, poll=0.02)
        first_publish = time.monotonic() - t0
        system.wait_for(lambda: len(system.db.records(kind="reading")) >= 50, timeout=60)
        time.sleep(5)  # steady state: meter read, uploads acknowledged, health ticking
        samples = []
        for _ in range(20):
            samples.append(rss_kib(agent.pid) / 1024)
            time.sleep(0.25)
        agent_rss = max(samples)
    bare = _bare_rss()
    return [
        Row(
            "agent RSS at steady state, MiB",
            agent_rss,
            bare,
            "<= 1.25x",
            agent_rss / bare <= 1.25,
            "interpreter importing the same libraries",
        ),
        Row(
            "start-up to first reading at the backend, s",
            first_publish,
            None,
            "report",
            None,
            "process start, meter probe+read, sign, upload, verify",
        ),
    ]
