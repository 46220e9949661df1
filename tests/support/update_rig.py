"""The update end-to-end rig: a provisioned box (real agent processes, broker, cloud) whose package database
is an offline OpenWrt root with the real opkg (tests/support/opkg_root.py). The test plays procd (starts the
agent again after it stops) and cron (runs the watchdog). The version "running" is the one opkg records."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from agent.wire.release import Chunk, ChunkRequest
from backend.commands import record_sent, sign_command, stored_result
from backend.release import ReleaseShelf
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt.package import Package, describe
from support.opkg_root import OpkgRoot, opkg_root
from testbed.harness import GLUCOAGENT, LocalSystem, device_config, spawn

BACKEND = str(Path(GLUCOAGENT).with_name("glucoagent-backend"))
Ipks = tuple[Package, Path, Package, Path]


def two_versions(out: Path) -> Ipks:
    """This tree's package and the same with the release number one up: v1, its .ipk, v2, its .ipk."""
    v1 = describe()
    v2 = dataclasses.replace(v1, release=v1.release + 1)
    return v1, B.write_ipk(v1, out / "1"), v2, B.write_ipk(v2, out / "2")


def release(system: LocalSystem, package: Path, *extra: str) -> bytes:
    """``glucoagent-backend release PACKAGE``: the signed manifest (the package goes on the cloud's shelf)."""
    out = subprocess.run(
        [BACKEND, "release", str(package), "--home", str(system.home.root), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return package.with_name(package.name + ".manifest").read_bytes()


class SlowShelf(ReleaseShelf):
    """The cloud's real shelf, answering each chunk 0.1 s late: a download long enough to be killed mid-way."""

    def chunk(self, req: ChunkRequest) -> Chunk | None:
        time.sleep(0.1)
        return super().chunk(req)


@dataclasses.dataclass
class Box:
    system: LocalSystem
    state: Path
    config: Path
    device_id: str
    root: OpkgRoot
    update: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    mqtt: dict[str, str] = dataclasses.field(default_factory=dict)

    def write_config(self, ports: list[tuple[str, str]] | None = None, **mqtt: str) -> None:
        """The box's UCI config: its meter port (kept once attached), update options, ``mqtt`` overrides."""
        self.mqtt = dict(mqtt)
        ports = ports if ports is not None else self.ports()
        sections: dict[str, dict[str, str]] = {"update": self.update, "agent": {"health_interval_s": "10"}}
        if mqtt:
            sections["mqtt"] = dict(mqtt)
        self.config = device_config(self.config, ports, **sections)

    def ports(self) -> list[tuple[str, str]]:
        link = self.state.parent / f"tty-{self.state.name}"
        return [(str(link), "auto")] if link.exists() else []

    def attach_meter(self, n: int) -> None:
        """A simulated meter holding ``n`` readings on a pty, configured on the box."""
        records = self.state.parent / f"{self.state.name}-meter.json"
        records.write_text(dumps(random_records("onetouch-ultra2", n, seed=16)))
        link = self.state.parent / f"tty-{self.state.name}"
        self.system.start_simulator("onetouch-ultra2", link, records)
        self.write_config([(str(link), "auto")], **self.mqtt)

    def readings(self) -> list[Any]:
        return self.system.db.records(device_id=self.device_id, kind="reading")

    def audit(self, n: int) -> None:
        """Every one of the meter's ``n`` readings in the cloud exactly once, the clinical stream gap-free."""
        assert self.system.wait_for(lambda: len(self.readings()) >= n, 90), self.log()[-3000:]
        time.sleep(1)  # a duplicate would arrive right behind
        keys = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"], r.fields["glu:meal"]) for r in self.readings()]
        assert len(keys) == n and len(set(keys)) == n, f"{len(keys)} readings, {len(set(keys))} distinct, {n} held"
        clinical = sorted(r.seq for r in self.system.db.records(device_id=self.device_id) if r.stream == "c")
        assert clinical == list(range(1, len(clinical) + 1))

    def start(self, *, connected: bool = True) -> None:
        before = self.log().count("uplink: connected")
        self.proc = self.system.start_agent(self.state, self.config)
        if connected:  # subscribed to its commands topic before it logs this: a command sent now reaches it
            assert self.system.wait_for(lambda: self.log().count("uplink: connected") > before, 30), self.log()

    def send(self, args: dict[str, Any], cmd_id: str | None = None) -> tuple[str, bytes]:
        cmd_id, envelope = sign_command(self.system.home.command_key, self.device_id, "update", args, cmd_id=cmd_id)
        record_sent(self.system.db, self.device_id, cmd_id, "update")
        assert self.system.service is not None
        self.system.service.publish(f"gluco/v1/dev/{self.device_id}/commands", envelope)
        return cmd_id, envelope

    def result(self, cmd_id: str, timeout: float = 90) -> tuple[str, str, str, Any]:
        def answered() -> bool:
            found = stored_result(self.system.db, self.device_id, cmd_id)
            return found is not None and found[0] != "sent"

        assert self.system.wait_for(answered, timeout), self.log()[-4000:]
        found = stored_result(self.system.db, self.device_id, cmd_id)
        assert found is not None
        return found

    def results_made(self, cmd_id: str) -> int:
        """How many final results of ``cmd_id`` the box made over all its starts (its log: one line each)."""
        return sum(self.log().count(f"command {cmd_id} (update) {s}:") for s in ("ok", "failed", "refused"))

    def exited(self, timeout: float = 120) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not stop after installing:\n{self.log()[-4000:]}") from None

    def health_shows(self, timeout: float = 60, **want: str) -> dict[str, Any]:
        """The newest health sample that carries ``want`` (``agent_version``, ``update_outcome``, ...)."""
        found: dict[str, Any] = {}

        def shown() -> bool:
            for rec in reversed(self.system.db.records(device_id=self.device_id, kind="health")):
                if all(rec.fields.get(f"health:{k}") == v for k, v in want.items()):
                    found.update(rec.fields)
                    return True
            return False

        assert self.system.wait_for(shown, timeout), self.log()[-3000:]
        return found

    def listed(self) -> dict[str, Any]:
        """This box's line of ``glucoagent-backend devices --json``."""
        out = subprocess.run([BACKEND, "devices", "--json", "--home", str(self.system.home.root)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        mine = [r for r in rows if r["device_id"] == self.device_id]
        assert len(mine) == 1, out.stdout
        return mine[0]

    def log(self) -> str:
        path = self.state / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""


def make_box(system: LocalSystem, tools: hosttools.Tools, ipks: Ipks, where: Path, **update: str) -> Box:
    """A provisioned box running v1 (opkg's database in an offline root), not started; ``update`` overrides."""
    v1, v1_ipk, _, _ = ipks
    root = opkg_root(tools, where, v1, v1_ipk)
    name = f"upd-{where.name[-12:]}".replace("_", "-")
    state = system.device_dir(name)
    out = system.provision(state, patient=f"patient-{name}")
    assert out.returncode == 0, out.stdout + out.stderr
    opts = {"install_command": root.command_line, "status_file": str(root.pm.status_file), "gate_s": "60",
            "chunk_timeout_s": "5", **update}  # fmt: skip
    box = Box(system, state, where / "glucoagent.conf", out.stdout.split()[-1], root, opts)
    box.write_config([])
    return box


REPO = Path(__file__).resolve().parents[2]
# How a test runs an agent from another source tree: its ``agent`` package first on the path.
LAUNCH = "import sys; sys.path.insert(0, sys.argv.pop(1)); from agent.cli import main; sys.exit(main())"


def newer_agent_tree(where: Path, migration: tuple[str, ...], oldest_reader: int) -> Path:
    """A copy of this tree's ``agent`` package with one buffer migration more: a release that changes the
    buffer schema. Returns the directory to put first on the path."""
    tree = where / "newer-agent"
    shutil.copytree(REPO / "agent", tree / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    schema = tree / "agent" / "buffer" / "schema.py"
    text = schema.read_text()
    extra = (
        f"\nMIGRATIONS[max(MIGRATIONS) + 1] = {migration!r}\n"
        f"OLDEST_READER[max(MIGRATIONS)] = {oldest_reader}\nSCHEMA_VERSION = max(MIGRATIONS)\n"
    )
    schema.write_text(text + extra)
    return tree


def start_from(box: Box, tree: Path) -> subprocess.Popen[bytes]:
    """Start the box's agent from the source tree ``tree`` (procd starting a new version's code)."""
    python = str(Path(GLUCOAGENT).with_name("python"))
    argv = [python, "-c", LAUNCH, str(tree), "--state-dir", str(box.state), "--config", str(box.config), "run"]
    box.proc = spawn(argv, box.state / "agent.log")
    box.system.procs.append(box.proc)
    return box.proc
