"""The CRL never lapses while the backend service runs (issue 12: every login failed 30 days after init).

The broker (libfaketime) and `glucoagent-backend serve` (the suite's clock shim: libfaketime cannot
run Python 3.11 here, see testbed/clockshim.py) keep running while their wall clock moves to
init + 31 days, then to init + 400 days. The CRL written at init says nextUpdate = init + 30 days;
past it OpenSSL refuses every client certificate. The service must re-issue it and make the broker
reload it, so a device keeps logging in.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from backend.broker import Broker
from backend.home import BackendHome
from testbed.client_certs import issue_client_cert
from testbed.clockshim import build_clock_shim

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
FAKETIME_FILE = "faketime.rc"  # relative: read from the broker's run dir, its cwd (it may have dropped root)
DAY = 86_400
ProbeFactory = Callable[..., Any]


class Clocks:
    """One wall-clock offset for the broker (libfaketime file) and the service (clock shim file)."""

    def __init__(self, broker_dir: Path, shim_file: Path) -> None:
        self.broker_file = broker_dir / FAKETIME_FILE
        self.shim_file = shim_file
        self.days = 0

    def set_days(self, days: int) -> None:
        self.days = days
        for path, text in ((self.broker_file, f"+{days}d\n"), (self.shim_file, f"{days * DAY}\n")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            if os.geteuid() == 0 and path == self.broker_file:
                st = path.parent.stat()
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[BackendHome, Broker, Clocks]]:
    assert LIBFAKETIME.exists(), "libfaketime missing: `make setup` installs Debian's faketime"
    home = BackendHome(tmp_path / "home")
    home.ensure()  # `glucoagent-backend init`: CRL nextUpdate = now + 30 days
    home.broker_dir.mkdir(parents=True)
    clocks = Clocks(home.broker_dir, tmp_path / "service-clock")
    clocks.set_days(0)
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": FAKETIME_FILE,
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    broker = Broker(home.pki, home.broker_dir, env=env)
    broker.start()
    service_env = {
        **os.environ,
        "LD_PRELOAD": str(build_clock_shim(tmp_path)),
        "SOAK_CLOCK_OFFSET_FILE": str(clocks.shim_file),
    }
    serve = [sys.executable, "-m", "backend.cli", "serve", "--home", str(home.root), "--port", str(broker.port)]
    serve += ["--crl-check-interval", "0.5"]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(serve, env=service_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_text(tmp_path / "serve.log", "CRL keeper: checking every", proc)
        yield home, broker, clocks
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        broker.stop()


def _logs_in_within(probe_factory: ProbeFactory, creds: Any, broker: Any, dev_id: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = probe_factory(creds, client_id=dev_id, broker=broker)
        if probe.connect():
            probe.close()
            return True
        probe.close()
        time.sleep(0.5)
    return False


def _broker_crl(broker: Broker) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((broker.run_dir / "tls" / "crl.pem").read_bytes())


def test_device_still_logs_in_31_and_400_days_after_init(
    running: tuple[BackendHome, Broker, Clocks], mqtt_probe: ProbeFactory
) -> None:
    home, broker, clocks = running
    init = dt.datetime.now(dt.UTC)
    dev_id = f"gd-{uuid.uuid4().hex[:12]}"
    creds = issue_client_cert(home.pki, dev_id, not_after=init + dt.timedelta(days=800))  # outlives the test's span
    assert _logs_in_within(mqtt_probe, creds, broker, dev_id, 30)

    for days in (31, 400):
        clocks.set_days(days)
        assert _logs_in_within(mqtt_probe, creds, broker, dev_id, 60), f"no login at init + {days} days"
        next_update = _broker_crl(broker).next_update_utc
        assert next_update > init + dt.timedelta(days=days + 25), (days, next_update)
    assert "CRL re-issued" in (home.root.parent / "serve.log").read_text()


def test_broker_and_service_started_400_days_after_init(tmp_path: Path, mqtt_probe: ProbeFactory) -> None:
    """A home left stopped for 400 days: `broker` and `serve` start with a CRL long past its nextUpdate."""
    home = BackendHome(tmp_path / "home")
    home.ensure()
    init = dt.datetime.now(dt.UTC)
    dev_id = f"gd-{uuid.uuid4().hex[:12]}"
    creds = issue_client_cert(home.pki, dev_id, not_after=init + dt.timedelta(days=800))
    # Both processes (and mosquitto, started by `broker` as a child, maybe after dropping root) read
    # the clock offset through a path relative to their working directory, the broker's run dir.
    home.broker_dir.mkdir(parents=True)
    (home.broker_dir / "clock-offset").write_text(f"{400 * DAY}\n")
    (home.broker_dir / "clock-offset").chmod(0o644)
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": "clock-offset"}
    cli = [sys.executable, "-m", "backend.cli"]
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    try:
        for args in (["broker"], ["serve", "--crl-check-interval", "0.5"]):
            log = (tmp_path / f"{args[0]}.log").open("wb")
            logs.append(log)
            cmd = [*cli, *args, "--home", str(home.root), "--port", str(port)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=home.broker_dir, stdout=log, stderr=subprocess.STDOUT))
            if args[0] == "broker":
                _wait_for_text(tmp_path / "broker.log", "mosquitto listening", procs[-1])

        where = SimpleNamespace(host="127.0.0.1", port=port)  # the probe needs only these; `broker` owns mosquitto
        assert _logs_in_within(mqtt_probe, creds, where, dev_id, 60)
        assert _broker_crl_at(home).next_update_utc > init + dt.timedelta(days=400)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        for log in logs:
            log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text(errors="replace")
        assert time.monotonic() < deadline, f"{text!r} not in {path} within {timeout_s}s"
        time.sleep(0.1)


def _broker_crl_at(home: BackendHome) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((home.broker_dir / "tls" / "crl.pem").read_bytes())
