"""Revocation taking effect on a running broker: ``reload_broker`` (the CRL copy refreshed, then SIGHUP),
``disconnect_identity`` (revoke closes an identity's connections at once) and ``CrlKeeper`` (re-issues
the CRL before it lapses). They work from another process too: the broker's pid is in ``mosquitto.pid``
in its run directory."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from pathlib import Path

from backend.broker_config import (
    CONTROL_TOPIC,
    LOG_FILE,
    PID_FILE,
    POLL_S,
    RELOAD_MARKER,
    START_TIMEOUT_S,
    TLS_DIR,
    BrokerError,
    broker_account,
    client_id_for,
    sync_crl,
)
from backend.mqtt_client import tls_client
from backend.pki import BACKEND_CN, ClientCreds, FleetPki

log = logging.getLogger(__name__)


def _broker_pid(run_dir: Path) -> int | None:
    """The pid in ``mosquitto.pid`` if it is a mosquitto running in ``run_dir``, else None."""
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if b"mosquitto" not in cmdline or cwd != run_dir.resolve():
        return None  # a stale pid file, the pid reused by something else
    return pid


def reload_broker(run_dir: Path, pki: FleetPki, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Copy the current CRL to the broker in ``run_dir`` and make it reload (SIGHUP); False if none runs there.

    mosquitto 2.0 re-reads its config, the ACL file and the listener's certificates, CRL
    included, on SIGHUP, without dropping anyone. It logs "Reloading config." first and
    reloads within the same loop pass, so a TLS handshake started after that line meets the
    new CRL. Works from any process that may signal the broker (its owner, or root).
    """
    try:
        sync_crl(run_dir, pki, broker_account())
    except OSError as exc:
        raise BrokerError(f"cannot hand the CRL to the broker in {run_dir}: {exc.strerror or exc}") from exc
    pid = _broker_pid(run_dir)
    if pid is None:
        return False
    log_path = run_dir / LOG_FILE

    def reloads() -> int:
        try:
            return log_path.read_text(errors="replace").count(RELOAD_MARKER)
        except FileNotFoundError:
            return 0

    seen = reloads()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise BrokerError(f"cannot signal the broker (pid {pid}) to reload: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + timeout_s
    while reloads() <= seen:
        if time.monotonic() > deadline:
            raise BrokerError(f"mosquitto (pid {pid}) did not log a config reload after SIGHUP")
        time.sleep(POLL_S)
    return True


def disconnect_identity(backend: ClientCreds, host: str, port: int, identity: str, timeout_s: float = 10.0) -> None:
    """Close every connection of ``identity`` (a certificate CN) at once, through the auth plugin.

    The backend publishes the identity on the plugin's control topic (only it may) and waits for
    the PUBACK, which mosquitto sends after the plugin has run.
    """
    client = tls_client(backend, client_id_for(BACKEND_CN))
    done = threading.Event()
    client.on_publish = lambda *_: done.set()
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot reach the broker at {host}:{port} to disconnect {identity}: {exc}") from exc
    client.loop_start()
    try:
        client.publish(CONTROL_TOPIC, identity.encode(), qos=1)
        if not done.wait(timeout_s):
            raise BrokerError(f"the broker at {host}:{port} did not confirm disconnecting {identity}")
    finally:
        client.disconnect()
        client.loop_stop()


class CrlKeeper:
    """Keeps the CRL the broker uses fresh: re-issues it when a day old, copies it over, reloads the broker.

    The CRL is valid for ``pki.CRL_DAYS`` (30) days; past its nextUpdate OpenSSL refuses every
    client certificate, so a fleet would be locked out 30 days after the last revocation. The
    running backend service calls ``check`` every ``interval_s`` (``glucoagent-backend serve``).
    """

    def __init__(self, pki: FleetPki, broker_run_dir: Path, interval_s: float = 600.0) -> None:
        self.pki = pki
        self.run_dir = broker_run_dir
        self.interval_s = interval_s

    def check(self) -> None:
        reissued = self.pki.refresh_crl_if_due()
        if reissued:
            log.info("CRL re-issued, next update %s", self.pki.crl_next_update().isoformat())
        current = self.run_dir / TLS_DIR / "crl.pem"
        if not reissued and current.exists() and current.read_bytes() == self.pki.crl_pem():
            return
        if reload_broker(self.run_dir, self.pki):
            log.info("broker in %s reloaded the CRL", self.run_dir)
        else:
            log.warning("no broker runs in %s: it loads the current CRL when it starts", self.run_dir)

    def run(self, stop: threading.Event) -> None:
        first = True
        while not stop.is_set():
            try:
                self.check()
                if first:
                    log.info(
                        "CRL keeper: checking every %.1fs, CRL valid until %s",
                        self.interval_s,
                        self.pki.crl_next_update().isoformat(),
                    )
                    first = False
            except Exception:  # keep refreshing: a lapse here would lock the fleet out in days
                log.exception("CRL refresh failed; retrying in %.0fs", self.interval_s)
            stop.wait(self.interval_s)
