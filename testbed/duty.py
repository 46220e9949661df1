"""A duty-cycled box (``agent.link = duty``) run for N simulated hours, for the duty-mode test and
``make bench``: readings arrive every few simulated hours, commands are sent while it sleeps.

Time is compressed by scaling, not by moving clocks: one simulated hour lasts ``hour_s`` real
seconds, and the reading interval and ``agent.wake_interval_s`` are scaled by it. The agent talks
to the broker through a counting TCP proxy (testbed/faultproxy.py), so bytes are what went on the
wire, TLS included; CPU and context switches come from /proc of the agent's process."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.faultproxy import TcpProxy, _Pair
from testbed.harness import BIN, LocalSystem, device_config

BACKEND_CLI = str(BIN / "glucoagent-backend")


@dataclasses.dataclass(frozen=True, slots=True)
class DutyFigures:
    link: str  # always | duty
    hours: float  # simulated
    hour_s: float  # real seconds per simulated hour
    connects: int  # TCP connections the agent opened
    cpu_s: float  # user + system CPU seconds of the agent process
    context_switches: int  # voluntary + involuntary, all threads
    wakeups: int  # voluntary context switches, all threads: the times the process went to sleep and woke
    real_s: float  # real seconds the figures cover (hours x hour_s)
    bytes_up: int
    bytes_down: int
    readings_sent: int  # readings the meter held
    readings_stored: list[tuple[str, int]]  # (meter time, mg/dL) as the backend stored them, duplicates kept
    commands_sent: list[str]  # command ids sent while the box was asleep (offline)
    command_runs: dict[str, int]  # command id -> times the box's log says it finished
    command_results: dict[str, str | None]  # command id -> status stored at the backend


class _CountingProxy(TcpProxy):
    """Keeps the byte counts of closed connections too."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.closed_up = 0
        self.closed_down = 0

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            if pair in self._pairs:
                self.closed_up += pair.bytes_up
                self.closed_down += pair.bytes_down
        super()._forget(pair)

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return (
                self.closed_up + sum(p.bytes_up for p in self._pairs),
                self.closed_down + sum(p.bytes_down for p in self._pairs),
            )


def _cpu_and_switches(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, all context switches, voluntary ones) of every thread of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (all threads)
    switches = voluntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that just ended
        switches += sum(int(n) for n in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", text, re.M))
        voluntary += sum(int(n) for n in re.findall(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M))
    return cpu, switches, voluntary


def run_duty_box(
    run: Path,
    hours: float = 24.0,
    *,
    hour_s: float = 2.0,
    reading_every_h: float = 4.0,
    wake_every_h: float = 1.0,
    commands_while_asleep: int = 3,
    link: str = "duty",
    port_scan_s: float = 3600.0,
) -> DutyFigures:
    """Run one box for ``hours`` simulated hours and return what it cost and what arrived."""
    n_readings = int(hours // reading_every_h)
    everything = random_records("onetouch-ultra2", max(n_readings, 1), seed=24)[:n_readings]  # newest first
    records = run / "meter.json"
    records.write_text(dumps([]))
    with LocalSystem(run / "sys") as system:
        proxy = _CountingProxy(system.broker.port)
        proxy.start()
        tty = run / "ttyDUTY"
        state = system.device_dir()
        if system.provision(state).returncode != 0:
            raise RuntimeError("provisioning failed")
        config = device_config(
            state / "glucoagent.uci",
            [(str(tty), "onetouch-ultra2")],
            agent={
                "link": link,
                "wake_interval_s": str(wake_every_h * hour_s),
                "port_scan_s": str(port_scan_s),  # the meter is noticed by events (agent/devwatch.py), not by polling
                "reread_s": "86400",
                "health_interval_s": str(max(10, round(hour_s))),
            },
            mqtt={"endpoint": proxy.endpoint, "backoff_min_s": "0.2", "backoff_cap_s": "2"},
        )
        agent = system.start_agent(state, config)
        device_id = str(json.loads((state / "device.json").read_text())["device_id"])
        sim: subprocess.Popen[bytes] | None = None
        sent: list[str] = []
        clis: list[subprocess.Popen[str]] = []
        start = time.monotonic()
        cpu0, sw0, vol0 = _cpu_and_switches(agent.pid)
        next_reading = start + reading_every_h * hour_s / 2  # mid-interval: the last one falls inside the run
        shown = 0
        command_at = [start + (i + 0.5) * hours * hour_s / max(commands_while_asleep, 1) for i in range(commands_while_asleep)]
        end = start + hours * hour_s
        try:
            while time.monotonic() < end:
                now = time.monotonic()
                if shown < n_readings and now >= next_reading:
                    shown += 1
                    next_reading += reading_every_h * hour_s
                    records.write_text(dumps(everything[n_readings - shown :]))
                    if sim is not None:  # the meter is unplugged and plugged in again: the box notices the port
                        os.killpg(sim.pid, 15)
                        sim.wait()
                        system.procs.remove(sim)
                        time.sleep(1.5)  # unplugged a while; plugged in again, its link is made anew: an event
                    sim = system.start_simulator("onetouch-ultra2", tty, records, "--baud", "0")
                if command_at and now >= command_at[0] and link == "duty" and _offline(system, device_id):
                    command_at.pop(0)
                    clis.append(_send_ping(system, device_id, timeout=hours * hour_s + 60))
                time.sleep(0.05)
            cpu1, sw1, vol1 = _cpu_and_switches(agent.pid)
            up, down = proxy.totals()
            # Let what the last wake-up owes arrive before counting it (not part of the figures).
            system.wait_for(lambda: len(system.db.records(kind="reading")) >= n_readings, timeout=wake_every_h * hour_s + 60)
            for cli in clis:
                _out, err = cli.communicate(timeout=wake_every_h * hour_s + 120)
                found = re.search(r"command (\S+):", err)
                if found:
                    sent.append(found.group(1))
        finally:
            proxy.close()
            for cli in clis:
                if cli.poll() is None:
                    cli.kill()
                    cli.communicate()
        log = (state / "agent.log").read_text()
        stored = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in system.db.records(kind="reading")]
        results = {c: (r[0] if (r := system.db.command_result(device_id, c)) else None) for c in sent}
        return DutyFigures(
            link=link,
            hours=hours,
            hour_s=hour_s,
            connects=proxy.accepted,
            cpu_s=round(cpu1 - cpu0, 3),
            context_switches=sw1 - sw0,
            wakeups=vol1 - vol0,
            real_s=hours * hour_s,
            bytes_up=up,
            bytes_down=down,
            readings_sent=n_readings,
            readings_stored=stored,
            commands_sent=sent,
            command_runs={c: len(re.findall(rf"command {re.escape(c)} \(ping\) ok", log)) for c in sent},
            command_results=results,
        )


def _offline(system: LocalSystem, device_id: str) -> bool:
    rows = system.db.query("SELECT status FROM devices WHERE device_id = ?", (device_id,))
    return bool(rows) and rows[0][0] == "offline"


def _send_ping(system: LocalSystem, device_id: str, timeout: float) -> subprocess.Popen[str]:
    argv = [BACKEND_CLI, "command", device_id, "ping", "--home", str(system.home.root),
            "--port", str(system.broker.port), "--timeout", str(timeout)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclasses.dataclass(frozen=True, slots=True)
class IdleFigures:
    link: str  # always | duty
    window_s: float  # real seconds measured
    cpu_s: float  # user + system CPU seconds of the agent process in the window
    wakeups: int  # voluntary context switches of all its threads in the window
    bytes_up: int  # on the wire, TLS included
    bytes_down: int

    def per_hour(self, value: float) -> float:
        return value * 3600 / self.window_s


def run_idle_box(run: Path, link: str, window_s: float = 60.0, **agent: str) -> IdleFigures:
    """An agent with its meter read and uploaded, then left alone ``window_s`` real seconds with the
    defaults a box runs with (port scan, health interval, keepalive, wake interval): what idling costs."""
    records = run / "meter.json"
    records.write_text(dumps(random_records("onetouch-ultra2", 3, seed=8)))
    with LocalSystem(run / "sys") as system:
        proxy = _CountingProxy(system.broker.port)
        proxy.start()
        try:
            tty = run / "ttyIDLE"
            system.start_simulator("onetouch-ultra2", tty, records, "--baud", "0")
            state = system.device_dir()
            if system.provision(state).returncode != 0:
                raise RuntimeError("provisioning failed")
            defaults = {"link": link, "port_scan_s": "5", "health_interval_s": "300"}
            config = device_config(
                state / "glucoagent.uci", [(str(tty), "onetouch-ultra2")], agent={**defaults, **agent},
                mqtt={"endpoint": proxy.endpoint},
            )  # fmt: skip
            started = time.monotonic()
            proc = system.start_agent(state, config)
            if not system.wait_for(lambda: len(system.db.records(kind="reading")) >= 3, timeout=60):
                raise RuntimeError("the readings did not arrive")
            # Acks applied, a duty box gone down, and the first health sample (5 s after start) taken: the
            # window holds the idle loops and keepalives; the next health sample comes after 300 s.
            time.sleep(max(3.0, started + 8.0 - time.monotonic()))
            cpu0, _sw0, vol0 = _cpu_and_switches(proc.pid)
            up0, down0 = proxy.totals()
            time.sleep(window_s)
            cpu1, _sw1, vol1 = _cpu_and_switches(proc.pid)
            up1, down1 = proxy.totals()
        finally:
            proxy.close()
    return IdleFigures(link, window_s, round(cpu1 - cpu0, 3), vol1 - vol0, up1 - up0, down1 - down0)
