"""Issues 9 and 17: what the running agent costs. Resident memory at steady state vs a floor
interpreter importing only what it must have (``ssl``, ``sqlite3``, the Ed25519 signer), its peak
through each piece of work that loads modules of its own (a command, an update, a renewal),
idle cost per hour (CPU, wake-ups, bytes), bytes on the wire per record, start-up to first upload.

The same-run baseline of the lazy imports is an *eager* agent: the same code started by a launcher that
first imports what the daemon now loads only when it needs it (``EAGER``), as it did before issue 17.
Peaks are VmHWM after the kernel's peak counter was reset (``/proc/PID/clear_refs`` 5) just before.

Bytes are the kernel's own TCP counters of the agent's connection to the broker (``ss -ti``:
``bytes_acked`` sent, ``bytes_received``), so they count TLS records, MQTT framing and payload,
without a proxy changing the timing. Wake-ups are voluntary context switches of the agent's
threads (``/proc/<pid>/task/*/status``): each is a sleep that ended.
"""

from __future__ import annotations

import compileall
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.buffer.intake import Recorder
from agent.buffer.store import Store
from agent.clock import Clock
from agent.config import AlertsSection
from agent.identity.credentials import load_identity
from agent.identity.signer import Signer
from bench.bench_store import in_range
from bench.common import rss_kib
from bench.table import Row
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import BIN, GLUCOAGENT, LocalSystem, device_config, spawn, stop_process

READINGS = 50
BACKLOG = 1_000  # queued before the agent starts: uploads in full batches
IDLE_WINDOW_S = 60.0
FLOOR_IMPORTS = "import ssl, sqlite3\nfrom cryptography.hazmat.primitives.asymmetric import ed25519\n"
# What the daemon held at steady state before issue 17 and now loads only for provisioning, renewal, an
# update, syslog, another cloud's profile, a lost link, a program to run (docs/field.md): the eager agent
# imports it at start, as the daemon did.
EAGER = (
    "cryptography.x509",
    "cryptography.hazmat.primitives.serialization",
    "agent.update.command",
    "logging.handlers",
    "agent.wire.aws",
    "agent.wire.azure",
    "agent.link.aws_jobs",
    "tenacity",
    "ctypes.util",
    "drivers.simulators.base",
    "cryptography.hazmat.primitives.asymmetric.ec",
)
EAGER_LAUNCHER = (
    "import importlib, sys\n"
    f"for name in {EAGER!r}: importlib.import_module(name)\n"
    "from agent.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
RUNNING_VERSION, NEW_VERSION = "0.1.0-1", "0.2.0-1"
PACKAGE_BYTES = 300_000
_TICK = os.sysconf("SC_CLK_TCK")


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, every thread


def _wakeups(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += _status(int(task.name), "voluntary_ctxt_switches")
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return total


def _wire_bytes(pid: int, port: int) -> tuple[int, int]:
    """(sent, received) TCP payload bytes of ``pid``'s connections to the broker on ``port``."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    sent = received = 0
    for entry in re.split(r"\n(?=\S)", out):
        if f"pid={pid}," not in entry:
            continue
        acked = re.search(r"bytes_acked:(\d+)", entry)
        got = re.search(r"bytes_received:(\d+)", entry)
        sent += int(acked.group(1)) - 1 if acked else 0  # the SYN counts as one acked byte
        received += int(got.group(1)) if got else 0
    return sent, received


def _sample(pid: int, port: int) -> tuple[float, float, int, int, int]:
    sent, received = _wire_bytes(pid, port)
    return time.monotonic(), _cpu_s(pid), _wakeups(pid), sent, received


def _floor(window_s: float) -> tuple[float, float, float]:
    """The floor interpreter: (RSS MiB, CPU s per hour, wake-ups per hour) sleeping ``window_s``."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_IMPORTS + "import time; time.sleep(3600)"])
    try:
        time.sleep(2.0)
        cpu0, wake0 = _cpu_s(proc.pid), _wakeups(proc.pid)
        time.sleep(window_s)
        per_hour = 3600 / window_s
        return (rss_kib(proc.pid) / 1024, (_cpu_s(proc.pid) - cpu0) * per_hour, (_wakeups(proc.pid) - wake0) * per_hour)
    finally:
        proc.kill()
        proc.wait()


def _reading_size(state: Path) -> float:
    """Mean signed size (COSE_Sign1 bytes) of the readings the agent kept in its buffer."""
    with sqlite3.connect(f"file:{state / 'buffer.db'}?mode=ro", uri=True) as db:
        (size,) = db.execute("SELECT avg(length(cose)) FROM outbox WHERE stream = 'c'").fetchone()
    return float(size)


def _health_size(state: Path) -> float:
    with sqlite3.connect(f"file:{state / 'buffer.db'}?mode=ro", uri=True) as db:
        (size,) = db.execute("SELECT avg(length(cose)) FROM outbox WHERE stream = 'h'").fetchone()
    return float(size or "nan")


# ru_maxrss keeps the high-water mark across fork and exec, so the child must be forked from a small
# process, not from this one (tens of MiB after the other benchmarks): a bare interpreter launches it.
_PEAK_OF = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)"
)


def _provision_peak(system: LocalSystem, state: Path) -> float:
    """``glucoagent provision`` run to its end; its own peak RSS (MiB) from the kernel's rusage."""
    argv = [
        GLUCOAGENT,
        "--state-dir",
        str(state),
        "provision",
        "--endpoint",
        system.broker.endpoint,
        f"--token={system.token('patient-1')}",
        "--patient=patient-1",
    ]
    out = subprocess.run([sys.executable, "-c", _PEAK_OF, *argv], capture_output=True, text=True, check=True)
    code, peak_kib = (int(x) for x in out.stdout.split())
    if code != 0:
        raise RuntimeError(f"provision failed ({code})")
    return peak_kib / 1024


def _renew(system: LocalSystem, device_id: str) -> None:
    proc = subprocess.run(
        [str(BIN / "glucoagent-backend"), "command", device_id, "renew_certificate", "--home", str(system.home.root),
         "--port", str(system.broker.port), "--timeout", "60"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if '"renewed"' not in proc.stdout:
        raise RuntimeError(f"renewal failed: {proc.stdout} {proc.stderr}")


def _command(system: LocalSystem, device_id: str, ctype: str, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [str(BIN / "glucoagent-backend"), "command", device_id, ctype, *args, "--home", str(system.home.root),
         "--port", str(system.broker.port), "--timeout", "120"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    if not proc.stdout.strip():
        raise RuntimeError(f"{ctype}: no result: {proc.stderr}")
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def _ping(system: LocalSystem, device_id: str) -> None:
    result = _command(system, device_id, "ping")
    if result.get("status") != "ok":
        raise RuntimeError(f"ping: {result}")


def _peak_through(pid: int, work: Callable[[], None]) -> float:
    """VmHWM (MiB) of ``pid`` through ``work``: the kernel's peak counter is reset first."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    work()
    time.sleep(1)
    return _status(pid, "VmHWM") / 1024


def _releases(system: LocalSystem, where: Path) -> tuple[Path, Path]:
    """Manifests of the running and a newer glucoagent package (random bytes: the box never installs them)."""
    manifests = []
    for version in (RUNNING_VERSION, NEW_VERSION):
        package = where / f"glucoagent_{version}_all.ipk"
        package.write_bytes(os.urandom(PACKAGE_BYTES))
        subprocess.run(
            [str(BIN / "glucoagent-backend"), "release", str(package), "--home", str(system.home.root)],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        manifests.append(package.with_name(package.name + ".manifest"))
    return manifests[0], manifests[1]


def _update(system: LocalSystem, device_id: str, running: Path, new: Path) -> None:
    """The whole update path but the package manager: both packages downloaded in chunks and verified, then
    the install command (``false``) refuses, so the agent keeps running (as on a box whose opkg fails)."""
    result = _command(system, device_id, "update", f"manifest={new}", f"previous={running}")
    if result.get("code") != "install_failed":
        raise RuntimeError(f"update: {result}")


def _started(system: LocalSystem, state: Path, config: Path, eager: bool) -> tuple[subprocess.Popen[bytes], float]:
    """The agent (or the eager one) started; seconds to its first reading at the backend."""
    device_id = load_identity(state).device_id
    t0 = time.monotonic()
    if eager:
        argv = [sys.executable, "-c", EAGER_LAUNCHER, "--state-dir", str(state), "--config", str(config), "run"]
        agent = spawn(argv, state / "agent.log")
        system.procs.append(agent)
    else:
        agent = system.start_agent(state, config)
    system.wait_for(lambda: len(system.db.records(device_id=device_id, kind="reading")) > 0, timeout=60, poll=0.02)
    first = time.monotonic() - t0
    system.wait_for(
        lambda: len(system.db.records(device_id=device_id, kind="reading")) >= READINGS, timeout=60, poll=0.02
    )
    return agent, first


def _steady_rss(pid: int) -> float:
    time.sleep(5)  # steady state: meter read, uploads acknowledged, health ticking
    samples = []
    for _ in range(20):
        samples.append(rss_kib(pid) / 1024)
        time.sleep(0.25)
    return max(samples)


def _import_cpu_s(code: str) -> float:
    """Best of 7: CPU seconds (user + system, from the kernel's rusage) of a fresh interpreter running ``code``.
    CPU time, not wall time: the neighbours on this shared machine move the wall clock by more than the imports."""
    best = float("inf")
    for _ in range(7):
        proc = subprocess.Popen([sys.executable, "-c", code])
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{code!r} exited {proc.returncode}")
        best = min(best, usage.ru_utime + usage.ru_stime)
    return best


def _meter(system: LocalSystem, where: Path, name: str) -> Path:
    records = where / f"{name}.json"
    records.write_text(dumps(random_records("onetouch-ultra2", READINGS, seed=8)))
    link = where / f"tty{name}"
    system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
    return link


def _fill(state: Path, n: int) -> None:
    """``n`` readings signed into the box's buffer before its agent starts: a steady upload in full batches."""
    ident = load_identity(state)
    store = Store(state / "buffer.db", max_records=n * 2)
    try:
        recorder = Recorder(store, Signer(ident.device_id, ident.key, ident.kid, Clock()), AlertsSection())
        seqs = recorder.accept_readings(
            "onetouch-ultra2:bench", in_range(random_records("onetouch-ultra2", n, seed=9)), complete=True
        )
        if len(seqs) != n:
            raise RuntimeError(f"filled {len(seqs)} of {n}")
    finally:
        store.close()


def _wire_batch(system: LocalSystem) -> tuple[float, float, float]:
    """A box with BACKLOG readings queued: (bytes sent, bytes received) per reading, the reading's signed size."""
    state = system.device_dir("wire")
    system.provision(state, patient="patient-2")
    _fill(state, BACKLOG)
    ident = load_identity(state)
    config = device_config(state / "glucoagent.uci", [])
    agent = system.start_agent(state, config)
    system.wait_for(
        lambda: len(system.db.records(device_id=ident.device_id, kind="reading")) >= BACKLOG, timeout=120, poll=0.02
    )
    sent, received = _wire_bytes(agent.pid, system.broker.port)
    stop_process(agent)
    return sent / BACKLOG, received / BACKLOG, _reading_size(state)


def _compiled() -> None:
    """Our modules' bytecode beside their sources, as the box's package ships it (openwrt/package.py).
    Without it a checkout run with PYTHONDONTWRITEBYTECODE compiles every module of ours at each start,
    and the compiler's scratch memory stays resident (about 3 MiB more: docs/field.md)."""
    root = Path(__file__).resolve().parent.parent
    for package in ("agent", "drivers"):
        if not compileall.compile_dir(str(root / package), quiet=1):
            raise RuntimeError(f"cannot compile {package}")


def run() -> list[Row]:
    _compiled()
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as d, LocalSystem(Path(d) / "sys") as system:
        state = system.device_dir()
        provision_peak = _provision_peak(system, state)
        device_id = load_identity(state).device_id
        status = Path(d) / "opkg-status"
        status.write_text(f"Package: glucoagent\nVersion: {RUNNING_VERSION}\nStatus: install ok installed\n")
        config = device_config(
            state / "glucoagent.uci",
            [(str(_meter(system, Path(d), "MEM")), "onetouch-ultra2")],
            agent={"health_interval_s": "10", "port_scan_s": "5"},  # port scan: the default
            update={"install_command": "false", "status_file": str(status)},
        )
        port = system.broker.port
        agent, first_publish = _started(system, state, config, eager=False)
        agent_rss = _steady_rss(agent.pid)
        start_peak = _status(agent.pid, "VmHWM") / 1024
        health0 = len(system.db.records(kind="health"))
        t_a, cpu_a, wake_a, sent_a, recv_a = _sample(agent.pid, port)
        time.sleep(IDLE_WINDOW_S)
        t_b, cpu_b, wake_b, sent_b, recv_b = _sample(agent.pid, port)
        health = len(system.db.records(kind="health")) - health0
        command_peak = _peak_through(agent.pid, lambda: _ping(system, device_id))
        after_command = rss_kib(agent.pid) / 1024
        running, new = _releases(system, Path(d))
        update_peak = _peak_through(agent.pid, lambda: _update(system, device_id, running, new))
        after_update = rss_kib(agent.pid) / 1024
        renew_peak = _peak_through(agent.pid, lambda: _renew(system, device_id))  # then the link moves to the new pair
        after_renewal = rss_kib(agent.pid) / 1024
        stop_process(agent)  # it holds the buffer locked while it runs
        health_size = _health_size(state)
        eager_state = system.device_dir("eager")
        system.provision(eager_state, patient="patient-3")
        eager_config = device_config(
            eager_state / "glucoagent.uci",
            [(str(_meter(system, Path(d), "EAGER")), "onetouch-ultra2")],
            agent={"health_interval_s": "10", "port_scan_s": "5"},
        )
        eager, eager_first = _started(system, eager_state, eager_config, eager=True)
        eager_rss = _steady_rss(eager.pid)
        stop_process(eager)
        batch_sent, batch_received, reading_size = _wire_batch(system)
    daemon_imports = "import agent.cli, agent.daemon, drivers.onetouch_ultra2\n"
    import_s = _import_cpu_s(daemon_imports)
    eager_import_s = _import_cpu_s("".join(f"import {m}\n" for m in EAGER) + daemon_imports)
    floor_import_s = _import_cpu_s(FLOOR_IMPORTS)
    floor_rss, floor_cpu, floor_wake = _floor(IDLE_WINDOW_S)
    per_hour = 3600 / (t_b - t_a)
    single = (sent_b - sent_a) / health if health else float("nan")
    floor_name = "interpreter importing only ssl, sqlite3, ed25519"
    return [
        Row(
            "agent RSS at steady state, MiB",
            agent_rss,
            floor_rss,
            "<= 1.15x",
            agent_rss / floor_rss <= 1.15,
            floor_name,
        ),
        Row(
            "agent RSS at steady state, MiB, vs the eager agent (lazy modules imported at start, as before)",
            agent_rss,
            eager_rss,
            "report",
            None,
            "eager agent, same meter, same run",
        ),
        Row("agent peak RSS to steady state (VmHWM), MiB", start_peak, floor_rss, "report", None, floor_name),
        Row("`glucoagent provision` peak RSS, MiB", provision_peak, floor_rss, "report", None, floor_name),
        Row("agent peak RSS through a signed command (ping), MiB", command_peak, agent_rss, "report", None, "steady"),
        Row("agent RSS after the command, MiB", after_command, agent_rss, "report", None, "steady"),
        Row(
            f"agent peak RSS through an update (2 x {PACKAGE_BYTES // 1000} kB downloaded, install refused), MiB",
            update_peak,
            agent_rss,
            "report",
            None,
            "steady",
        ),
        Row("agent RSS after the update, MiB", after_update, agent_rss, "report", None, "steady"),
        Row("agent peak RSS through a certificate renewal, MiB", renew_peak, agent_rss, "report", None, "steady"),
        Row("agent RSS after a renewal, MiB", after_renewal, agent_rss, "report", None, "steady"),
        Row(
            f"bytes sent per reading, backlog of {BACKLOG} in batches (TLS+MQTT+payload, all of the session)",
            batch_sent,
            reading_size,
            "<= 1.3x",
            batch_sent / reading_size <= 1.3,
            "signed reading's own size",
        ),
        Row(
            f"bytes received per reading, backlog of {BACKLOG} (acks, TLS, all of the session)",
            batch_received,
            reading_size,
            "report",
            None,
            "signed reading's own size",
        ),
        Row(
            "bytes sent per single record (health every 10 s, with its share of keepalives)",
            single,
            health_size,
            "report",
            None,
            "signed health record's own size",
        ),
        Row(
            "idle always-on: CPU s per hour (health every 10 s, port scan 5 s)",
            (cpu_b - cpu_a) * per_hour,
            floor_cpu,
            "report",
            None,
            "floor interpreter asleep",
        ),
        Row(
            "idle always-on: wake-ups per hour (voluntary context switches)",
            (wake_b - wake_a) * per_hour,
            floor_wake,
            "report",
            None,
            "floor interpreter asleep",
        ),
        Row("idle always-on: bytes sent per hour", (sent_b - sent_a) * per_hour, None, "report", None),
        Row("idle always-on: bytes received per hour", (recv_b - recv_a) * per_hour, None, "report", None),
        Row(
            "start-up to first reading at the backend, s (process start, meter probe+read, sign, upload, verify)",
            first_publish,
            eager_first,
            "report",
            None,
            "eager agent, same run",
        ),
        Row(
            "interpreter start + the daemon's imports, CPU s (best of 7)",
            import_s,
            eager_import_s,
            "report",
            None,
            "with the lazy modules imported too (eager)",
        ),
        Row(
            "interpreter start + the floor's imports, CPU s (best of 7)",
            floor_import_s,
            import_s,
            "report",
            None,
            "the daemon's imports",
        ),
    ]
