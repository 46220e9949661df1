"""Issue 7: the agent on the emulated MIPS device (the .ipk installed into the mipsel root, run under
qemu-mipsel-static) next to the same agent run natively from the venv: start-up time (process start to
the first reading verified at the backend) and resident memory at steady state. Reported, not gated.

Resident memory under qemu-user is the VmRSS of the qemu process (which *is* the agent: the launcher
execs into it), so it includes the emulator's own overhead: its TCG translation cache, its host-side
mappings and the guest's address-space bookkeeping. It is not the figure a real MIPS box would show; a
bare emulated interpreter importing the same libraries is measured alongside to separate the two.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

from bench.common import rss_kib
from bench.table import Row
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from openwrt.build_ipk import build_ipk
from openwrt.mipsroot import GUEST_QEMU, build_root, install_ipk, run_in_root
from testbed.harness import LocalSystem, device_config

N = 50
#: What the agent imports that costs memory (same list as bench_memory's bare interpreter).
IMPORTS = (
    "import paho.mqtt.client, serial, cryptography.hazmat.primitives.asymmetric.ed25519, cbor2, tenacity, sqlite3, ssl"
)
TIMEOUT_S = 180
STEADY_S = 5.0


def _sample_rss_mib(pid: int, samples: int = 20, every: float = 0.25) -> float:
    out = []
    for _ in range(samples):
        out.append(rss_kib(pid) / 1024)
        time.sleep(every)
    return max(out)


def _measure(system: LocalSystem, device_id: str, start: Callable[[], Popen[bytes]]) -> tuple[float, float]:
    """Start the agent (``start()`` returns its Popen); seconds to its first reading at the backend, RSS MiB."""
    t0 = time.monotonic()
    agent = start()
    try:

        def count() -> int:
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.returncode}")
            return len(system.db.records(device_id=device_id, kind="reading"))

        if not system.wait_for(lambda: count() > 0, timeout=TIMEOUT_S, poll=0.02):
            raise RuntimeError("no reading at the backend")
        first = time.monotonic() - t0
        if not system.wait_for(lambda: count() >= N, timeout=TIMEOUT_S):
            raise RuntimeError(f"only {count()} of {N} readings at the backend")
        time.sleep(STEADY_S)  # steady state: meter read, uploads acknowledged
        return first, _sample_rss_mib(agent.pid)
    finally:
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def _emulated_bare_rss(root: Path) -> float:
    code = f"import sys; sys.path[:0] = ['/usr/lib/glucoagent/vendor']; {IMPORTS}; print('ready', flush=True); "
    code += "import time; time.sleep(60)"
    proc = run_in_root(root, ["/usr/bin/python3", "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("emulated interpreter did not import the libraries")
        time.sleep(1.0)
        return _sample_rss_mib(proc.pid, samples=8)
    finally:
        proc.kill()
        proc.wait()


def _native(system: LocalSystem, state: Path, config: Path) -> tuple[str, Callable[[], Popen[bytes]]]:
    prov = system.provision(state, "patient-native")
    if prov.returncode != 0:
        raise RuntimeError(f"native provisioning failed: {prov.stderr[-2000:]}")
    return prov.stdout.strip().rsplit(" ", 1)[-1], lambda: system.start_agent(state, config)


def _emulated(system: LocalSystem, root: Path, state: Path, config: Path) -> tuple[str, Callable[[], Popen[bytes]]]:
    """Provisioned under the emulator too, like the box; the agent's output goes to ``state/agent.log``."""
    argv = ["/usr/bin/glucoagent", "--state-dir", str(state)]
    prov = run_in_root(
        root,
        [*argv, "provision", "--endpoint", system.broker.endpoint, f"--token={system.token('patient-emulated')}",
         "--patient=patient-emulated"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = prov.communicate(timeout=TIMEOUT_S)
    if prov.returncode != 0:
        raise RuntimeError(f"emulated provisioning failed: {err[-2000:]}")

    def start() -> Popen[bytes]:
        with (state / "agent.log").open("ab") as log:
            return run_in_root(root, [*argv, "--config", str(config), "run"], stdout=log, stderr=subprocess.STDOUT)

    return out.strip().rsplit(" ", 1)[-1], start


def run() -> list[Row]:
    # The guest sees the host's /tmp only: the root, state dirs and ptys all live there.
    d = Path(tempfile.mkdtemp(prefix="bench-openwrt-", dir="/tmp"))
    try:
        root = install_ipk(build_ipk(d / "dist"), d / "root", build_root())
        records = d / "meter.json"
        records.write_text(dumps(random_records("onetouch-ultra2", N, seed=71)))
        figures = {}
        with LocalSystem(d / "sys") as system:
            for name in ("native", "emulated"):  # one after the other: neither competes with the other for CPU
                link = d / f"tty{name}"
                system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
                state = system.device_dir(name)
                config = device_config(
                    state / "glucoagent.uci", [(str(link), "onetouch-ultra2")], agent={"health_interval_s": "10"}
                )
                if name == "native":
                    device_id, start = _native(system, state, config)
                else:
                    device_id, start = _emulated(system, root, state, config)
                figures[name] = _measure(system, device_id, start)
        bare = _emulated_bare_rss(root)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    (emu_start, emu_rss), (nat_start, nat_rss) = figures["emulated"], figures["native"]
    qemu = f"qemu-user ({GUEST_QEMU.rsplit('/', 1)[1]}) on this host"
    return [
        Row(
            "emulated MIPS: start-up to first reading at the backend, s",
            emu_start,
            nat_start,
            "report",
            None,
            "native agent",
            f"{qemu}; process start, probe+read, sign, upload, verify",
        ),
        Row(
            "emulated MIPS: agent RSS at steady state, MiB",
            emu_rss,
            nat_rss,
            "report",
            None,
            "native agent",
            "VmRSS of the qemu process: includes the emulator's own overhead",
        ),
        Row(
            "emulated MIPS: agent RSS vs bare emulated interpreter, MiB",
            emu_rss,
            bare,
            "report",
            None,
            "emulated python3 importing the same libraries",
            "both under qemu: the ratio is the agent's own share",
        ),
    ]
