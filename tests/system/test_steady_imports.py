"""Issue 17 (memory): what the running daemon holds at steady state excludes what only provisioning,
renewal or an update needs, the modules of meters not configured, and the test and BLE stacks.

The real agent (``agent.cli.main``, as the ``glucoagent`` script runs it) against the real broker and
backend, with one Ultra 2 on a pseudo-terminal; a two-line launcher adds one thing: on SIGUSR2 it writes
the process's ``sys.modules`` to a file (the debug path; the agent does not use SIGUSR2). Steady state:
every reading at the backend, health samples ticking, and a signed command (``ping``) received, decoded,
run and answered. Then a certificate renewal: what it loads is loaded when it runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.identity.credentials import load_identity
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import BIN, LocalSystem, device_config, spawn

READINGS = 5
LAUNCHER = """
import os, signal, sys
OUT = sys.argv[1]
def dump(*_):
    with open(OUT + ".tmp", "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    os.replace(OUT + ".tmp", OUT)
signal.signal(signal.SIGUSR2, dump)
from agent.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Loaded only by the work that needs them (docs/field.md "What the box costs"): never at steady state.
LAZY = {
    "cryptography.x509",  # provisioning, renewal, the relaxed-validity check of a box without a clock
    "cryptography.hazmat.primitives.serialization",  # making a key, a CSR, a P-256 key file
    "agent.identity.provisioning",
    "agent.update.command",  # an update command
    "agent.update.fetch",
    "agent.update.install",
    "agent.update.keys",
    "agent.update.staging",
    "logging.handlers",  # only where syslog is the target (this test logs to stderr)
    "agent.wire.aws",  # the other clouds' profiles: this box is on the default one
    "agent.wire.azure",
    "agent.link.aws_jobs",
    "agent.identity.dps",
    "agent.identity.aws_provisioning",
    "tenacity",  # the reconnect backoff: at the first failed or lost connection
    "concurrent",  # (tenacity's)
    "subprocess",  # stepping the clock, sync_time, reboot, an update's install
    "ctypes.util",  # the clock's adjtimex is found in the process's own symbols
    "drivers.simulators",  # `glucoagent simulate` only (the daemon builds the same parser)
    "cryptography.hazmat.primitives.asymmetric.ec",  # a P-256 key: this box's is Ed25519
    "drivers.novopen",  # the pen driver: no pen configured
    "drivers.contour_astm",  # meters not configured
    "drivers.onetouch_ultraeasy",
    "drivers.ble",  # the BLE stack: no controller configured
    "bumble",
    "hypothesis",  # test-only
    "pytest",
    "testbed",
}


def _modules(agent: subprocess.Popen[bytes], out: Path) -> set[str]:
    """The agent's ``sys.modules`` now."""
    out.unlink(missing_ok=True)
    os.kill(agent.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return set(out.read_text().split("\n"))


def _held(modules: set[str], roots: set[str]) -> set[str]:
    return {m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)}


def _command(system: LocalSystem, device_id: str, ctype: str) -> dict[str, object]:
    out = subprocess.run(
        [str(BIN / "glucoagent-backend"), "command", device_id, ctype, "--home", str(system.home.root),
         "--port", str(system.broker.port), "--timeout", "60"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.stdout.strip(), out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_the_daemon_holds_only_what_its_steady_state_needs(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        state = system.device_dir()
        system.provision(state, patient="patient-1")
        device_id = load_identity(state).device_id
        records = tmp_path / "meter.json"
        records.write_text(dumps(random_records("onetouch-ultra2", READINGS, seed=3)))
        link = tmp_path / "ttyU2"
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        config = device_config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")], agent={"health_interval_s": "10"})
        dump = tmp_path / "modules.txt"
        argv = [sys.executable, "-c", LAUNCHER, str(dump), "--state-dir", str(state), "--config", str(config), "run"]
        agent = spawn(argv, state / "agent.log")
        system.procs.append(agent)
        assert system.wait_for(lambda: len(system.db.records(device_id=device_id, kind="reading")) >= READINGS, 60)
        assert system.wait_for(lambda: len(system.db.records(device_id=device_id, kind="health")) >= 1, 30)
        assert _command(system, device_id, "ping").get("status") == "ok"
        time.sleep(1)
        steady = _modules(agent, dump)
        # the dump is the daemon's (a test that could not fail otherwise)
        assert {"paho.mqtt.client", "sqlite3", "cbor2", "agent.daemon", "agent.link.uplink", "drivers.onetouch_ultra2"} <= steady
        assert _held(steady, LAZY) == set()

        assert _command(system, device_id, "renew_certificate").get("status") == "ok"
        assert "cryptography.x509" in _modules(agent, dump)  # loaded when the renewal needed it
