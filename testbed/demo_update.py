"""`make demo-update` (``python -m testbed.demo_update``): one software update end to end, then a broken one
rolled back, with a meter read throughout (issue 16, docs/updates.md).

On this machine: mosquitto (mutual TLS, ACLs), the reference cloud, and a box: an offline OpenWrt root in
which OpenWrt's real opkg (built from ../shared/openwrt-tools) installed glucoagent release 1; the agent
that runs is the root's own launcher and code (testbed/update_box.py). The rig plays procd (respawn after
5 s, as the init script asks; ``/etc/init.d/glucoagent restart`` is a flag file) and cron (the installed
watchdog every ``--cron-s`` seconds; every minute on a box). A simulated OneTouch Ultra 2 gains a reading
every ``--grow-s`` seconds the whole time.

1. release 2 and a broken release 3 (its launcher imports a module the release lacks: it crashes at
   start) are signed with ``glucoagent-backend release``;
2. ``update`` to release 2: chunked download over MQTT, opkg install, restart, health gate: ``ok updated``;
   then a forged release 3 and release 3 signed for the other package manager: ``refused``, nothing changed;
3. ``update`` to release 3: installed, crashes at every start, the gate deadline passes, the watchdog
   reinstalls release 2 and restarts it, which reports ``failed rolled_back``;
4. the meter stops growing, the box drains, and the backend's records are audited against what the meter
   held: ``delivered N/N, lost 0, duplicates 0``; plus the versions, outcomes and the rollback time.

``--format apk``: the same on an apk box (OpenWrt 25.12+; tests/openwrt/test_update_apk.py runs that).
Exit 0 only when every step did what it should and the audit is clean. ``run_update_demo`` is also what
``make bench`` (bench/bench_update.py) measures the rollback time with.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.cli import dispatch
from agent.update.install import PENDING_FILE
from agent.update.pkgdb import read_marker
from agent.update.staging import UPDATE_DIR
from backend.commands import record_sent, sign_command, stored_result
from drivers.simulators.records import random_records
from openwrt import build_apk as A
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import EXEC_MODE, LAUNCHER, Entry, Package, describe
from testbed.harness import GLUCOAGENT, LocalSystem, device_config, spawn, stop_process
from testbed.soak_devices import Meter
from testbed.update_box import BoxRoot, apk_root, opkg_root

BACKEND = str(Path(GLUCOAGENT).with_name("glucoagent-backend"))
PATIENT = "demo-patient-0016"
PROTOCOL = "onetouch-ultra2"
GATE_S = 30  # update.gate_s: the smallest the config allows
RESPAWN_S = 5.0  # procd's respawn timeout (the init script's "respawn 3600 5 0")
BROKEN_LAUNCHER = b'''#!/usr/bin/python3
"""glucoagent, a broken release (make demo-update): its launcher imports a module the release lacks."""

import sys

sys.path[:0] = ["/usr/lib/glucoagent", "/usr/lib/glucoagent/vendor"]

from agent.cli_next import main  # noqa: E402

sys.exit(main())
'''


class DemoFailed(Exception):
    """A step did not do what it should; the message says which."""


@dataclasses.dataclass
class Figures:
    """What the demo measured (seconds, wall clock of this machine)."""

    versions: list[str]  # release 1, 2, 3 as the package manager writes them
    good_update_s: float  # release 2: installed -> running and its gate passed (the result stored)
    rollback_s: float  # release 3: installed -> release 2 running again and the rollback reported
    deadline_to_reported_s: float  # of which: from the gate deadline on (cron wait, reinstall, restart, report)
    reinstall_s: float  # the package manager alone installing release 3 over release 2 (the rig's baseline)
    delivered: int
    expected: int
    lost: int
    duplicates: int
    outcomes: list[tuple[str, str, str]]  # (what was sent, status, code)
    running: str | None  # the version the package database records at the end
    tool: str  # opkg or apk


class Clock:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self.out = say

    def say(self, text: str) -> None:
        self.out(f"[{time.monotonic() - self.t0:6.1f}s] {text}")


class Procd:
    """procd's part: start the installed agent, respawn it RESPAWN_S after it exits, restart it at once when
    the restart flag appears (what ``/etc/init.d/glucoagent restart`` does on a box)."""

    def __init__(self, box: BoxRoot, argv: list[str], log: Path, flag: Path, clock: Clock) -> None:
        self.box, self.argv, self.log, self.flag, self.clock = box, argv, log, flag, clock
        self.stopping = threading.Event()
        self.starts: list[tuple[float, str | None]] = []  # (time.time(), package version at start)
        self.exits: list[tuple[str | None, int]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._loop, name="procd", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        if self.proc is not None:
            stop_process(self.proc)

    def _restart_requested(self) -> bool:
        if self.flag.exists():
            self.flag.unlink(missing_ok=True)
            return True
        return False

    def _loop(self) -> None:
        while not self.stopping.is_set():
            version = self.box.running
            self.starts.append((time.time(), version))
            self.clock.say(f"procd: starting glucoagent {version} from the root")
            self.proc = spawn(
                self.argv, self.log, {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            )
            restart = False
            while self.proc.poll() is None and not self.stopping.is_set():
                if self._restart_requested():
                    restart = True
                    stop_process(self.proc)
                    break
                time.sleep(0.05)
            if self.stopping.is_set():
                break
            rc = self.proc.wait()
            if restart:
                self.clock.say(f"procd: restart requested: glucoagent {version} stopped")
                continue
            self.exits.append((version, rc))
            self.clock.say(f"procd: glucoagent {version} exited with {rc}; respawn in {RESPAWN_S:g} s")
            deadline = time.monotonic() + RESPAWN_S
            while time.monotonic() < deadline and not self.stopping.is_set() and not self._restart_requested():
                time.sleep(0.05)


class Cron:
    """cron's part: the watchdog installed in the root, every ``period`` seconds."""

    def __init__(self, box: BoxRoot, state: Path, flag: Path, period: float, clock: Clock) -> None:
        self.box, self.state, self.flag, self.period, self.clock = box, state, flag, period, clock
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cron", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=130)

    def _loop(self) -> None:
        while not self.stopping.wait(self.period):
            out = self.box.watchdog(self.state, script=self.box.installed_watchdog, restart=f"touch {self.flag}")
            for line in (out.stdout + out.stderr).splitlines():
                self.clock.say(f"cron: {line}")


class Grower:
    """The patient takes a measurement every ``period`` seconds: the meter's memory grows (the simulator
    restarts with one more record, as `make soak` does)."""

    def __init__(self, meter: Meter, period: float) -> None:
        self.meter, self.period = meter, period
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="meter", daemon=True)

    def _loop(self) -> None:
        while not self.stopping.wait(self.period) and self.meter.held < len(self.meter.everything):
            self.meter.stop()
            self.meter.held += 1
            self.meter.start()


def broken_release(pkg: Package) -> Package:
    """Release +1 of ``pkg`` whose launcher fails at start (ModuleNotFoundError), everything else equal."""
    files = tuple(Entry(LAUNCHER, BROKEN_LAUNCHER, EXEC_MODE) if e.path == LAUNCHER else e for e in pkg.files)
    return dataclasses.replace(pkg, release=pkg.release + 1, files=files)


def sign_release(system: LocalSystem, package: Path, clock: Clock, *extra: str) -> bytes:
    out = subprocess.run(
        [BACKEND, "release", str(package), "--home", str(system.home.root), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise DemoFailed(f"glucoagent-backend release {package.name}: {out.stderr.strip()}")
    for line in out.stdout.strip().splitlines():
        clock.say(f"    {line}")
    return package.with_name(package.name + ".manifest").read_bytes()


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}\n{tail}")
        time.sleep(0.05)


def run_update_demo(
    run: Path,
    tools: hosttools.Tools,
    *,
    grow_s: float = 2.0,
    cron_s: float = 5.0,
    say: Callable[[str], None] = print,
    fmt: str = "ipk",
) -> Figures:
    """The whole demo under ``run`` on an opkg box (``fmt`` ipk, OpenWrt 24.10) or an apk box (apk, 25.12+);
    Figures, or DemoFailed naming the step that went wrong."""
    clock = Clock(say)
    tool = "opkg" if fmt == "ipk" else "apk"
    clock.say(f"OpenWrt's real {tool}: {tools.opkg if fmt == 'ipk' else tools.apk}")
    v1 = describe()
    v2 = dataclasses.replace(v1, release=v1.release + 1)
    v3 = broken_release(v2)
    dist = run / "dist"
    if fmt == "ipk":
        pkgs = [B.write_ipk(p, dist / str(p.release)) for p in (v1, v2, v3)]
        versions = [p.ipk_version for p in (v1, v2, v3)]
        box = opkg_root(tools, run / "box", v1, pkgs[0])
        other = pkgs[2].with_name(f"{v3.name}-{v3.apk_version}.apk")  # the same bytes, signed as an .apk
    else:
        pkgs = [A.write_apk(p, dist / str(p.release), tools.apk) for p in (v1, v2, v3)]
        versions = [p.apk_version for p in (v1, v2, v3)]
        box = apk_root(tools, run / "box", v1, pkgs[0])
        other = pkgs[2].with_name(f"{v3.name}_{v3.ipk_version}_all.ipk")
    clock.say(f"packages built: {', '.join(p.name for p in pkgs)} (release {v3.release} crashes at start)")
    clock.say(f"box: {box.root} with glucoagent {box.running} installed by {tool}")

    system = LocalSystem(run)
    stack = contextlib.ExitStack()
    with stack:
        system.start()
        stack.callback(system.stop)
        clock.say(f"cloud: mosquitto on {system.broker.endpoint} (TLS, client certificates, ACLs) and the backend")
        state = system.device_dir("box-state")
        agent = [*box.agent_argv("--state-dir", str(state))]
        prov = subprocess.run(
            [*agent, "provision", "--endpoint", system.broker.endpoint, f"--token={system.token(PATIENT)}",
             f"--patient={PATIENT}"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if prov.returncode != 0:
            raise DemoFailed(f"provisioning failed: {prov.stdout}{prov.stderr}")
        device_id = prov.stdout.split()[-1]
        clock.say(f"box provisioned by its installed agent: device {device_id}")

        everything = random_records(PROTOCOL, 400, seed=16)
        meter = Meter(PROTOCOL, run / "ttyMETER0", run / "meter.json", run / "simulator.log", everything, 5)
        meter.start()
        stack.callback(meter.stop)
        grower = Grower(meter, grow_s)
        update = {"install_command": box.command_line, "status_file": str(box.pm.status_file),
                  "gate_s": str(GATE_S), "chunk_timeout_s": "5"}  # fmt: skip
        config = device_config(
            run / "glucoagent.uci", [(str(meter.link), "auto")], update=update, agent={"health_interval_s": "10"}
        )
        flag = run / "restart-glucoagent"
        log = state / "agent.log"
        procd = Procd(box, [*agent, "--config", str(config), "run"], log, flag, clock)
        cron = Cron(box, state, flag, cron_s, clock)
        procd.start()
        stack.callback(procd.stop)
        cron.start()
        stack.callback(cron.stop)
        grower.thread.start()
        stack.callback(grower.stopping.set)
        clock.say(f"meter: simulated OneTouch Ultra 2 on {meter.link}, a new reading every {grow_s:g} s")

        def readings() -> list[Any]:
            return system.db.records(device_id=device_id, kind="reading")

        _wait(lambda: len(readings()) >= 3, 60, "the first readings", log)
        clock.say(f"readings arriving: {len(readings())} at the backend")

        clock.say("release manager signs the releases (release key, apart from the command key):")
        m1 = sign_release(system, pkgs[0], clock)
        m2 = sign_release(system, pkgs[1], clock, "--min-from", versions[0])
        m3 = sign_release(system, pkgs[2], clock, "--min-from", versions[1])
        other.write_bytes(pkgs[2].read_bytes())
        m_other = sign_release(system, other, clock, "--min-from", versions[1])

        def send(args: dict[str, Any]) -> str:
            cmd_id, envelope = sign_command(system.home.command_key, device_id, "update", args)
            record_sent(system.db, device_id, cmd_id, "update")
            assert system.service is not None
            system.service.publish(f"gluco/v1/dev/{device_id}/commands", envelope)
            return cmd_id

        def result(cmd_id: str) -> tuple[str, str, str, Any] | None:
            found = stored_result(system.db, device_id, cmd_id)
            return found if found is not None and found[0] != "sent" else None

        def answered(cmd_id: str) -> Callable[[], bool]:
            return lambda: result(cmd_id) is not None

        marker = state / UPDATE_DIR / PENDING_FILE
        outcomes: list[tuple[str, str, str]] = []

        # --- a good update ---------------------------------------------------------------------
        before = len(readings())
        clock.say(f"cloud sends update {versions[0]} -> {versions[1]} (with release 1's manifest: its first update)")
        good_id = send({"manifest": m2, "previous": m1})
        _wait(marker.exists, 120, "the install of release 2", log)
        installed_at = marker.stat().st_mtime
        clock.say(f"box: downloaded over MQTT, verified, installing with {tool} (pending marker, gate {GATE_S} s)")
        _wait(answered(good_id), 120, "the health gate of release 2", log)
        good_done = time.time()
        found = result(good_id)
        assert found is not None
        outcomes.append((f"update to {versions[1]}", found[0], found[1]))
        clock.say(f"result: {found[0]} {found[1]} {found[3]}: {found[2]}")
        if found[:2] != ("ok", "updated") or box.running != versions[1]:
            raise DemoFailed(
                f"release 2: expected ok updated and {versions[1]} installed, got {found[:2]}, {box.running}"
            )
        good_update_s = good_done - installed_at
        clock.say(f"readings during the update: {len(readings()) - before} more at the backend")

        # --- refused before anything changes: a forged release, a release for the other package manager -----------
        exits = len(procd.exits)
        for what, manifest, code in (
            ("a forged release 3 (one signature byte flipped)", m3[:-1] + bytes([m3[-1] ^ 1]), "bad_signature"),
            (f"release 3 signed as {other.suffix[1:]} for this {fmt} box", m_other, "wrong_format"),
        ):
            clock.say(f"cloud sends {what}")
            refused_id = send({"manifest": manifest})
            _wait(answered(refused_id), 60, f"the answer to {what}", log)
            found = result(refused_id)
            assert found is not None
            outcomes.append((what, found[0], found[1]))
            clock.say(f"result: {found[0]} {found[1]}: {found[2]}")
            if found[:2] != ("refused", code) or box.running != versions[1] or len(procd.exits) != exits:
                raise DemoFailed(f"{what}: expected refused {code}, nothing changed; got {found[:2]}, {box.running}")

        # --- a broken update, rolled back ------------------------------------------------------------
        _wait(lambda: len(readings()) > before + 2, 60, "readings from release 2", log)
        before = len(readings())
        clock.say(f"cloud sends update {versions[1]} -> {versions[2]} (the broken release)")
        bad_id = send({"manifest": m3})
        held_at_broken = meter.held
        _wait(marker.exists, 120, "the install of release 3", log)
        broken_at = marker.stat().st_mtime
        fields = read_marker(marker) or {}
        deadline = float(fields.get("DEADLINE", "0") or 0)
        clock.say(
            f"box: release 3 installing; the watchdog rolls it back unless its gate passes by {time.strftime('%H:%M:%S', time.localtime(deadline))}"
        )
        _wait(lambda: box.running == versions[2] or result(bad_id) is not None, 60, f"{tool} to install release 3", log)
        _wait(answered(bad_id), GATE_S + 4 * cron_s + 120, "the rollback report", log)
        reported = time.time()
        found = result(bad_id)
        assert found is not None
        outcomes.append((f"update to {versions[2]}", found[0], found[1]))
        clock.say(f"result: {found[0]} {found[1]} {found[3]}: {found[2]}")
        if found[:2] != ("failed", "rolled_back") or box.running != versions[1]:
            raise DemoFailed(
                f"release 3: expected failed rolled_back and {versions[1]} back, got {found[:2]}, {box.running}"
            )
        crashed = [rc for version, rc in procd.exits if version == versions[2] and rc != 0]
        if not crashed:
            raise DemoFailed("release 3 never started and crashed: the rollback proved nothing")
        rollback_s = reported - broken_at
        taken = {(r.meter_time.isoformat(), r.value_mgdl) for r in meter.holding()[: meter.held - held_at_broken]}
        back = [t for t, version in procd.starts if t > broken_at and version == versions[1]]
        crash = [line for line in log.read_text(errors="replace").splitlines() if "Error:" in line]
        clock.say(f"release 3 crashed {len(crashed)} times ({crash[-1].strip() if crash else 'see ' + str(log)})")
        clock.say(
            f"rollback: release 2 running again {back[0] - broken_at:.1f} s and reporting {rollback_s:.1f} s after "
            "release 3's install"
        )

        def arrived() -> bool:
            return taken <= {(r.fields.get("glu:meter_time"), r.fields.get("glu:mgdl")) for r in readings()}

        _wait(arrived, 60, "the readings taken while release 3 crashed", log)
        clock.say(
            f"the {len(taken)} readings the meter took meanwhile are at the backend, "
            f"{time.time() - reported:.1f} s after the rollback report"
        )

        # --- drain and audit ----------------------------------------------------------------------
        grower.stopping.set()
        grower.thread.join(timeout=30)
        held = meter.holding()
        clock.say(f"meter stops growing at {len(held)} readings; waiting for the box to deliver them")
        expected = {(r.meter_time.isoformat(), r.value_mgdl) for r in held}

        def stored() -> list[tuple[Any, Any]]:
            return [(r.fields.get("glu:meter_time"), r.fields.get("glu:mgdl")) for r in readings()]

        with contextlib.suppress(DemoFailed):
            _wait(lambda: expected <= set(stored()), 90, "every reading at the backend", log)
        time.sleep(1.0)  # a late duplicate would show up now
        got = stored()
        delivered = len(set(got) & expected)
        seqs = sorted(r.seq for r in system.db.records(device_id=device_id) if r.stream == "c")
        if seqs != list(range(1, len(seqs) + 1)):
            raise DemoFailed(f"the clinical sequence numbers have gaps: {seqs}")
        procd.stop()
        cron.stop()
        running = box.running
        # The baseline: the package manager alone replacing release 2 by release 3 again (a real install;
        # reinstalling the installed file is a no-op for apk), the agent stopped.
        t = time.monotonic()
        out = subprocess.run([*box.pm.install, str(pkgs[2])], capture_output=True, text=True, timeout=120, check=False)
        reinstall_s = time.monotonic() - t
        if out.returncode != 0 or box.running != versions[2]:
            raise DemoFailed(f"plain {tool} install of release 3 failed: {out.stdout}{out.stderr}")
        return Figures(
            versions=versions,
            good_update_s=good_update_s,
            rollback_s=rollback_s,
            deadline_to_reported_s=reported - deadline,
            reinstall_s=reinstall_s,
            delivered=delivered,
            expected=len(expected),
            lost=len(expected) - delivered,
            duplicates=len(got) - len(set(got)),
            outcomes=outcomes,
            running=running,
            tool=tool,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.demo_update",
        description="One signed update end to end, then a broken one rolled back, with readings throughout.",
    )
    parser.add_argument("--tools-src", type=Path, default=Path("../shared/openwrt-tools"),
                        help="OpenWrt's tool sources (opkg is built from them once, cached)")  # fmt: skip
    parser.add_argument("--run-root", type=Path, default=Path("runs"))
    parser.add_argument("--grow-s", type=float, default=2.0, help="the meter gains a reading this often")
    parser.add_argument("--cron-s", type=float, default=5.0, help="the watchdog runs this often (a box: 60)")
    parser.add_argument(
        "--format", choices=("ipk", "apk"), default="ipk", help="an opkg box (24.10) or an apk box (25.12+)"
    )
    parser.set_defaults(func=_main)
    return dispatch(parser.parse_args(argv), "glucoagent-demo-update")


def _main(args: argparse.Namespace) -> int:
    run = (args.run_root / time.strftime("demo-update-%Y%m%d-%H%M%S")).resolve()
    print(f"demo-update: everything goes under {run}", flush=True)
    try:
        tools = hosttools.load(hosttools.build(args.tools_src))
        f = run_update_demo(
            run, tools, grow_s=args.grow_s, cron_s=args.cron_s, fmt=args.format, say=lambda s: print(s, flush=True)
        )
    except (DemoFailed, hosttools.ToolsError) as exc:
        print(f"demo-update: FAILED: {exc}", flush=True)
        return 1
    finally:
        print("demo-update: stopped agent, meter, watchdog, backend and broker", flush=True)
    print()
    print(f"versions: {' -> '.join(f.versions)} -> {f.versions[1]} (rolled back)")
    for what, status, code in f.outcomes:
        print(f"{what}: {status} {code}")
    print(f"good update: installed -> running, gate passed, reported in {f.good_update_s:.1f} s")
    print(
        f"rollback: broken release installed -> previous version running and reporting in {f.rollback_s:.1f} s "
        f"(gate {GATE_S} s; after its deadline {f.deadline_to_reported_s:.1f} s: cron wait, reinstall, restart, "
        f"report; the same install by {f.tool} alone takes {f.reinstall_s:.2f} s)"
    )
    print(f"delivered {f.delivered}/{f.expected}, lost {f.lost}, duplicates {f.duplicates}")
    return 0 if f.lost == 0 and f.duplicates == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
