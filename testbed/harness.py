"""The whole system on one machine: broker, backend, device directories, agent and simulators.

Used by `make demo` and by the end-to-end, crash and fault tests, so that all of
them exercise exactly the same real processes and the same provisioning flow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.wire import telemetry
from backend.broker import Broker
from backend.db import BackendDb
from backend.home import BackendHome
from backend.provisioning import new_token
from backend.service import BackendService

BIN = Path(sys.executable).parent
GLUCOAGENT = str(BIN / "glucoagent")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A child in its own process group (so SIGKILL takes its whole tree), output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class LocalSystem:
    """Broker + backend service (in this process) under one run directory."""

    def __init__(self, run: Path, *, broker_port: int | None = None, broker_conf: Sequence[str] = ()) -> None:
        self.run = run
        run.mkdir(parents=True, exist_ok=True)
        self.home = BackendHome(run / "backend")
        self.home.ensure()
        self.broker: Broker = self.home.broker(port=broker_port, extra_conf=broker_conf)
        self.home.crl_reloader = self.broker.reload_crl  # revocations take effect at once
        self.db: BackendDb = self.home.db()
        self.service: BackendService | None = None
        self._thread: threading.Thread | None = None
        self.on_record: Callable[[str, telemetry.Record], None] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []

    # --- cloud side ------------------------------------------------------------------------------
    def start(self) -> None:
        self.broker.start()
        self.start_backend()

    def start_backend(self) -> None:
        self.service = self.home.service("localhost", self.broker.port, self.db)
        self.service.on_record = lambda dev, rec: self.on_record(dev, rec) if self.on_record else None
        self._thread = threading.Thread(target=self.service.run, name="backend", daemon=True)
        self._thread.start()
        if not self.service.ready.wait(20):
            raise RuntimeError("backend could not connect to the broker")

    def stop_backend(self) -> None:
        if self.service:
            self.service.stop()
        if self._thread:
            self._thread.join(timeout=5)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.stop_backend()
        self.broker.stop()

    def __enter__(self) -> LocalSystem:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def token(self, patient: str, ttl_s: float = 3600) -> str:
        token = new_token()
        self.db.add_token(token, patient, ttl_s)
        return token

    # --- device side -----------------------------------------------------------------------------
    def device_dir(self, name: str = "device") -> Path:
        """A fresh box: only the factory files (fleet CA, claim certificate and key)."""
        state = self.run / name
        factory = state / "factory"
        factory.mkdir(parents=True, exist_ok=True)
        claim = self.home.pki.claim
        for src, dst in ((self.home.pki.ca_path, "ca.crt"), (claim.cert, "claim.crt"), (claim.key, "claim.key")):
            shutil.copy(src, factory / dst)
        return state

    def glucoagent(
        self, state: Path, *args: str, config: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [GLUCOAGENT, "--state-dir", str(state)]
        if config is not None:
            argv += ["--config", str(config)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, check=False)

    def provision(
        self, state: Path, patient: str = "patient-1", token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        token = token or self.token(patient)
        return self.glucoagent(
            state, "provision", "--endpoint", self.broker.endpoint, f"--token={token}", f"--patient={patient}"
        )

    def start_agent(self, state: Path, config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = spawn([GLUCOAGENT, "--state-dir", str(state), "--config", str(config), "run"], state / "agent.log", env)
        self.procs.append(proc)
        return proc

    def start_simulator(
        self, protocol: str, link: Path, records: Path | None = None, *extra: str
    ) -> subprocess.Popen[bytes]:
        argv = [GLUCOAGENT, "simulate", protocol, "--link", str(link)]
        if records is not None:
            argv += ["--records", str(records)]
        proc = spawn([*argv, *extra], self.run / f"simulator-{link.name}.log")
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while not link.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"simulator did not come up: {(self.run / f'simulator-{link.name}.log').read_text()}"
                )
            time.sleep(0.05)
        return proc

    def wait_for(self, predicate: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(poll)
        return predicate()


def device_config(path: Path, ports: list[tuple[str, str]], **options: dict[str, str]) -> Path:
    """A UCI config for a test or demo device; ``options`` maps section -> {option: value}."""
    sections = {"agent": {"port_scan_s": "0.5", "health_interval_s": "30", "log_target": "stderr"}}
    for section, opts in options.items():
        sections.setdefault(section, {}).update(opts)
    lines = []
    for section, opts in sections.items():
        lines.append(f"config {section} '{section}'")
        lines += [f"\toption {k} '{v}'" for k, v in opts.items()]
        lines.append("")
    for i, (port, protocol) in enumerate(ports, 1):
        kind = "pen" if protocol == "novopen" else "meter"
        lines += [f"config {kind} '{kind}{i}'", f"\toption port '{port}'", f"\toption protocol '{protocol}'", ""]
    path.write_text("\n".join(lines))
    return path
