"""`make soak`: the whole system for N minutes under a fault schedule, then a loss/duplicate audit.

Real processes throughout: mosquitto with mutual TLS and ACLs, the reference backend,
one provisioned agent, three simulated meters (OneTouch Ultra 2, Contour ASTM,
OneTouch UltraEasy) and a simulated NovoPen, each on its own pty. The meters' memories
grow all the time (every ``--grow-s`` seconds each simulator is restarted with a
superset of its records, as tests/system/test_crash.py does), and a fault schedule cycles
through:

* ``agent_sigkill``: SIGKILL of the agent's process group, restarted 0.5-2 s later (one to
  three times in a row, so some kills land during start-up, a meter read or an upload);
* ``broker_kill`` (SIGKILL, started again seconds later) and ``broker_restart`` (SIGTERM);
* ``net_cut_rst`` / ``net_cut_fin``, ``net_black_hole``, ``net_refuse`` and ``net_flap``
  through testbed/faultproxy.py between the agent and the broker;
* ``disk_full``: the agent's state directory is a small tmpfs this script mounts; a
  ballast file fills it, then goes away (half the time the agent is SIGKILLed and
  restarted while the disk is full);
* ``clock_jump``: the agent's wall clock jumps (hours, days, back by minutes or an
  hour) and is set right again; half the time the link is cut so that the agent
  reconnects (and checks certificates) under the wrong clock; sometimes it restarts
  under it. libfaketime 0.9.10 (Debian) cannot run Python 3.11 here (with
  ``FAKETIME_DONT_FAKE_MONOTONIC=1`` ``time.sleep`` fails with EINVAL; with a faked
  monotonic clock ``threading`` waits hang, as ``sem_clockwait`` is not intercepted),
  so a small LD_PRELOAD shim (testbed/clockshim.py, built with ``cc`` into the run
  directory) shifts CLOCK_REALTIME, ``gettimeofday`` and ``time`` by the seconds in a
  file it re-reads every 0.2 s, and leaves monotonic clocks alone, as a real clock
  step does. Without a C compiler the clock jumps are skipped, and the report says so.

At the end the faults stop, the meters stop growing and the agent drains. The audit
compares what the meters and the pen held (accepted) with what the backend stored
(delivered): lost and duplicated must both be 0, or the exit status is 1.
``python -m testbed.soak --minutes 5`` prints the table and writes docs/reliability.md.

This module runs the system; the devices are in testbed/soak_devices.py, the fault schedule and
actions in testbed/soak_faults.py, the audit and report in testbed/soak_report.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from drivers.simulators.records import random_records
from testbed.clockshim import build_clock_shim
from testbed.faultproxy import TcpProxy
from testbed.harness import GLUCOAGENT, LocalSystem, device_config, spawn
from testbed.soak_devices import METER_CAP, METERS, PEN_SERIAL, Meter, Pen, pen_doses, rss_kib
from testbed.soak_faults import fault_loop
from testbed.soak_report import report

log = logging.getLogger("soak")
ROOT = Path(__file__).resolve().parent.parent
TMPFS_SIZE = "24m"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run = (args.run_dir or ROOT / "runs" / f"soak-{stamp}").resolve()
        self.run.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.crashes: list[str] = []
        self.lock = threading.RLock()  # agent start/stop
        self.grow_lock = threading.Lock()  # simulator restarts
        self.stop_faults = threading.Event()
        self.stop_all = threading.Event()
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_starts = 0
        self.agent_started_at = 0.0
        self.rss: list[tuple[float, int, int]] = []  # (t since start, agent incarnation, KiB)
        self.t0 = time.monotonic()
        self.tmpfs = False
        self.clock_file = self.run / "clock-offset"
        self.clock_file.write_text("0\n")
        self.shim: Path | None = None
        self.system: LocalSystem | None = None
        self.proxy: TcpProxy | None = None
        self.meters: list[Meter] = []
        self.pen: Pen | None = None
        self.state = self.run / "device"
        self.config = self.run / "glucoagent.uci"

    # --- setup -----------------------------------------------------------------------------------
    def build_shim(self) -> None:
        try:
            self.shim = build_clock_shim(self.run)
        except RuntimeError as exc:
            self.notes.append(f"clock jumps skipped: {exc}")

    def mount_state(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.notes.append("disk full skipped: not root, so no tmpfs for the state directory")
            return
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(state)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            self.notes.append(f"disk full skipped: mount tmpfs failed: {proc.stderr.strip()}")
            return
        self.tmpfs = True

    def agent_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.shim is not None:
            env["LD_PRELOAD"] = str(self.shim)
            env["SOAK_CLOCK_OFFSET_FILE"] = str(self.clock_file)
        return env

    def start_agent(self) -> None:
        with self.lock:
            assert self.system is not None
            state = self.state
            argv = [GLUCOAGENT, "--state-dir", str(state), "--config", str(self.config), "run"]
            self.agent = spawn(argv, self.run / "agent.log", self.agent_env())
            self.agent_starts += 1
            self.agent_started_at = time.monotonic()

    def kill_agent(self, sig: signal.Signals = signal.SIGKILL) -> int | None:
        with self.lock:
            proc, self.agent = self.agent, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.crashes.append(f"agent did not stop within 20 s of {sig.name}; killed")
            return None

    # --- background threads ----------------------------------------------------------------------
    def grower(self) -> None:
        """Meters and pen gain records all through the fault phase."""
        while not self.stop_faults.wait(self.args.grow_s):
            with self.grow_lock:
                for m in self.meters:
                    if m.held < min(METER_CAP, len(m.everything)):
                        m.held = min(METER_CAP, len(m.everything), m.held + self.rng.randint(1, 3))
                        m.stop()
                        m.start()
                if self.pen is not None and self.pen.held < len(self.pen.everything):
                    self.pen.held += 1
                    self.pen.stop()
                    self.pen.start()

    def monitor(self) -> None:
        """Restart an agent that died by itself (a finding), and sample its memory."""
        while not self.stop_all.wait(2.0):
            with self.lock:
                proc = self.agent
                if proc is not None and proc.poll() is not None:
                    tail = (self.run / "agent.log").read_text(errors="replace")[-1500:]
                    self.crashes.append(
                        f"t={self.elapsed():.0f}s agent exited by itself, rc={proc.returncode}: ...{tail}"
                    )
                    log.error("agent exited by itself (rc %s); restarting", proc.returncode)
                    self.start_agent()
                    continue
                if proc is not None:
                    kib = rss_kib(proc.pid)
                    if kib:
                        self.rss.append((self.elapsed(), self.agent_starts, kib))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # --- faults ----------------------------------------------------------------------------------

    # --- the run ---------------------------------------------------------------------------------
    def accepted(self) -> tuple[set[str], set[tuple[str, int]]]:
        readings = {r.record_key for m in self.meters for r in m.holding()}
        doses = {(PEN_SERIAL, t) for t, _ in self.pen.holding()} if self.pen else set()
        return readings, doses

    def delivered(self) -> tuple[collections.Counter[str], collections.Counter[tuple[str, int]]]:
        assert self.system is not None
        readings = collections.Counter(r.fields["glu:key"] for r in self.system.db.records(kind="reading"))
        doses = collections.Counter(
            (str(r.fields["ins:pen"]), int(r.fields["ins:relative_time"])) for r in self.system.db.records(kind="dose")
        )
        return readings, doses

    def all_delivered(self) -> bool:
        acc_r, acc_d = self.accepted()
        got_r, got_d = self.delivered()
        return acc_r <= set(got_r) and acc_d <= set(got_d)

    def execute(self) -> int:
        self.build_shim()
        self.system = system = LocalSystem(self.run)
        system.start()
        self.proxy = TcpProxy(system.broker.port).start()
        self.mount_state(self.state)
        try:
            return self._execute(system)
        finally:
            self.stop_all.set()
            self.stop_faults.set()
            self.kill_agent(signal.SIGTERM)
            for m in self.meters:
                m.stop()
            if self.pen:
                self.pen.stop()
            self.proxy.close()
            system.stop()
            if self.tmpfs:
                with contextlib.suppress(OSError):
                    shutil.copytree(self.state, self.run / "device-final", ignore=shutil.ignore_patterns("ballast"))
                subprocess.run(["umount", str(self.state)], check=False)

    def _execute(self, system: LocalSystem) -> int:
        args = self.args
        state = self.state
        system.device_dir("device")  # factory files into the (mounted) state directory
        prov = system.provision(state)
        if prov.returncode != 0:
            raise RuntimeError(f"provisioning failed: {prov.stdout}{prov.stderr}")
        assert self.proxy is not None
        ports: list[tuple[str, str]] = []
        for i, protocol in enumerate(METERS):
            everything = random_records(protocol, METER_CAP, seed=args.seed * 10 + i)
            link = self.run / f"tty-{protocol}"
            self.meters.append(
                Meter(protocol, link, self.run / f"{protocol}.json", self.run / f"sim-{protocol}.log", everything, 20)
            )
            ports.append((str(link), protocol))
        if not args.no_pen:
            link = self.run / "tty-pen"
            self.pen = Pen(link, self.run / "pen.json", self.run / "sim-pen.log", pen_doses(self.rng, 400), 10)
            ports.append((str(link), "novopen"))
        self.config = device_config(
            self.run / "glucoagent.uci",
            ports,
            agent={
                "port_scan_s": "0.5",
                "reread_s": "10",
                "health_interval_s": "30",
                "run_dir": str(self.run / "device-run"),
                "log_target": "stderr",
            },
            mqtt={
                "endpoint": self.proxy.endpoint,
                "keepalive": "10",
                "batch_records": "20",
                "ack_timeout_s": "5",
                "connect_timeout_s": "5",
                "backoff_min_s": "0.2",
                "backoff_cap_s": "5",
                "stable_s": "10",
            },
        )
        for m in self.meters:
            m.start()
        if self.pen:
            self.pen.start()
        self.start_agent()
        threading.Thread(target=self.monitor, name="monitor", daemon=True).start()

        log.info("warm-up: first reads and uploads")
        if not system.wait_for(self.all_delivered, timeout=90, poll=0.5):
            log.warning("warm-up: not everything delivered within 90 s; going on")
        time.sleep(3)
        with self.lock:
            rss_start = rss_kib(self.agent.pid) if self.agent else None

        grower = threading.Thread(target=self.grower, name="grower", daemon=True)
        grower.start()
        faults_start = time.monotonic()
        fault_loop(self, faults_start + args.minutes * 60)
        fault_s = time.monotonic() - faults_start
        self.stop_faults.set()
        grower.join(timeout=30)
        self.proxy.steady()
        self.proxy.forward()
        self.clock_file.write_text("0\n")
        (state / "ballast").unlink(missing_ok=True)
        if not system.broker.running:
            system.broker.start()

        log.info("draining (up to %d s)", args.drain_s)
        drain_start = time.monotonic()
        drained = system.wait_for(self.all_delivered, timeout=args.drain_s, poll=1.0)
        drain_s = time.monotonic() - drain_start
        time.sleep(5)  # a late duplicate would land now
        with self.lock:
            rss_end = rss_kib(self.agent.pid) if self.agent else None
            end_incarnation = self.agent_starts
        rc = self.kill_agent(signal.SIGTERM)
        if rc not in (0, None):
            self.crashes.append(f"agent exited {rc} on the final SIGTERM")

        integrity = "n/a"
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(state / "buffer.db", timeout=5)
            integrity = str(con.execute("PRAGMA integrity_check").fetchone()[0])
            con.close()
        return report(
            self,
            fault_s=fault_s,
            drain_s=drain_s,
            drained=drained,
            rss_start=rss_start,
            rss_end=rss_end,
            end_incarnation=end_incarnation,
            integrity=integrity,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the fault phase (default 30)")
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--grow-s", type=float, default=10.0, help="meters gain records this often")
    p.add_argument("--drain-s", type=float, default=240.0, help="longest wait for the final delivery")
    p.add_argument("--no-pen", action="store_true", help="meters only")
    p.add_argument("--run-dir", type=Path, help="default: runs/soak-<time>")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "reliability.md")
    p.add_argument("--no-docs", action="store_true", help="do not write the report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("agent").setLevel(logging.WARNING)
    logging.getLogger("backend").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C: children stopped, tmpfs unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return Soak(args).execute()


if __name__ == "__main__":
    sys.exit(main())
