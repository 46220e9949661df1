"""A real mosquitto for tests and ``make demo``: mutual TLS only, client ids bound, pattern ACLs, persistence.

``Broker`` writes ``mosquitto.conf``, ``acl``, a copy of the TLS files (``tls/``) and of the
auth plugin into a run directory and runs ``mosquitto -c mosquitto.conf`` there, as a child
process on a free loopback port; every path in the config is relative to that directory, so
mosquitto needs no access to the directories above it. Started as root, mosquitto drops to
user ``mosquitto`` right after reading its config; the run directory is then its own (0700),
the key copy 0600. The listener is TLS only (TLS 1.2 minimum) and requires a client certificate
signed by the fleet CA and not on the CRL. The plugin (backend/mosquitto/glucoagent_auth.c,
built by ``make setup``) binds the client id to the certificate CN and makes the CN the MQTT
user name, and the ACL confines each identity (see docs/security.md).

The config, the ACL and the client-id rules are rendered in ``backend/broker_config.py``; CRL reload,
revoke's disconnect and ``CrlKeeper`` are in ``backend/revocation.py``; the paho client in
``backend/mqtt_client.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from backend.broker_config import (
    ACL_FILE,
    AUTH_PLUGIN_BUILT,
    AUTH_PLUGIN_ENV,
    AUTH_PLUGIN_FILE,
    CONF_FILE,
    LOG_FILE,
    LOOPBACK,
    MOSQUITTO_FALLBACK,
    OUT_FILE,
    PERSIST_DIR,
    PID_FILE,
    POLL_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TLS_DIR,
    WS_PATH,
    BrokerError,
    broker_account,
    install_file,
    render_acl,
    render_config,
    sync_crl,
)
from backend.mqtt_client import tls_context
from backend.pki import FleetPki
from backend.revocation import reload_broker

__all__ = ["Broker", "find_auth_plugin", "find_mosquitto"]

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def find_mosquitto() -> Path:
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    if MOSQUITTO_FALLBACK.exists():
        return MOSQUITTO_FALLBACK
    raise BrokerError(
        "mosquitto not found on PATH nor at /usr/sbin/mosquitto: run `make setup` (apt-get install mosquitto)"
    )


def find_auth_plugin() -> Path:
    """The compiled client-id binding plugin; $GLUCOAGENT_AUTH_PLUGIN overrides where it is."""
    path = Path(os.environ.get(AUTH_PLUGIN_ENV) or AUTH_PLUGIN_BUILT)
    if not path.is_file():
        raise BrokerError(
            f"the broker's auth plugin {path} is missing: run `make setup` (it needs cc, mosquitto-dev and libssl-dev)"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the broker if the process (thread) that started it dies, so no broker outlives a crashed test."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Broker:
    """One mosquitto child process; ``with Broker(pki, run_dir) as b:`` starts and stops it."""

    def __init__(
        self,
        pki: FleetPki,
        run_dir: Path,
        *,
        port: int | None = None,
        autosave_interval_s: int = 1,
        verbose: bool = False,
        extra_conf: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        websockets: bool = False,
    ) -> None:
        """``extra_conf``: lines appended to mosquitto.conf; ``env``: added to mosquitto's environment (faketime);
        ``websockets``: a second listener, MQTT over WebSockets with TLS (``ws_endpoint``), same PKI and rules."""
        self.pki = pki
        self.run_dir = run_dir
        self._fixed_port = port is not None
        self._port = port or 0
        self.autosave_interval_s = autosave_interval_s
        self.verbose = verbose
        self.extra_conf = tuple(extra_conf)
        self.env = dict(env or {})
        self._exe = find_mosquitto()
        self._plugin = find_auth_plugin()
        self._proc: subprocess.Popen[bytes] | None = None
        self.websockets = websockets
        self._ws_port = 0

    # --- where ----------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if not self._port:
            raise BrokerError("the broker has no port until it is started")
        return self._port

    @property
    def ca_path(self) -> Path:
        return self.pki.ca_path

    @property
    def endpoint(self) -> str:
        return f"mqtts://localhost:{self.port}"

    @property
    def ws_port(self) -> int:
        if not self._ws_port:
            raise BrokerError("the broker has no websockets listener (websockets=True), or is not started")
        return self._ws_port

    @property
    def ws_endpoint(self) -> str:
        return f"wss://localhost:{self.ws_port}{WS_PATH}"

    @property
    def conf_path(self) -> Path:
        return self.run_dir / CONF_FILE

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start mosquitto and return once its port completes a TLS handshake with the backend identity."""
        if self.running:
            raise BrokerError(f"the broker is running already (pid {self.pid})")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self._port = _free_port()
                if self.websockets:
                    self._ws_port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
                self._fixed_port = True  # from now on the port is ours: restart and start-after-kill keep it
            except BrokerError:
                out = self._output()
                lost_race = "Address already in use" in out or "ERROR on binding" in out
                self._terminate(signal.SIGKILL)
                if lost_race and attempt + 1 < attempts:
                    continue  # another process took the free port between our probe and mosquitto's bind
                raise
            return

    def stop(self) -> None:
        """SIGTERM and wait: mosquitto saves its persistence database on the way out."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; only what the last autosave wrote survives."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port with the same persistence database."""
        self.stop()
        self.start()

    def reload_crl(self) -> None:
        """Make the broker refuse certificates revoked since it started, without dropping anyone."""
        if not self.running:
            raise BrokerError("the broker is not running")
        if not reload_broker(self.run_dir, self.pki):
            raise BrokerError(f"the broker in {self.run_dir} did not take the reload signal")
        self._wait_ready()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------------
    def _write_files(self) -> None:
        """Config, ACL, plugin and TLS copies in the run dir, all readable by the account mosquitto runs as."""
        account = broker_account()
        self.pki.refresh_crl_if_due()  # a CRL past its nextUpdate would refuse every client from the start
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tls = self.run_dir / TLS_DIR
        for d in (self.run_dir, self.run_dir / PERSIST_DIR, tls):
            d.mkdir(exist_ok=True)
            d.chmod(0o700)
        install_file(tls / "ca.crt", self.pki.ca_path.read_bytes(), 0o644, account)
        install_file(tls / "server.crt", self.pki.server_cert_path.read_bytes(), 0o644, account)
        install_file(tls / "server.key", self.pki.server_key_path.read_bytes(), 0o600, account)
        sync_crl(self.run_dir, self.pki, account)
        install_file(self.run_dir / AUTH_PLUGIN_FILE, self._plugin.read_bytes(), 0o755, account)
        install_file(self.run_dir / ACL_FILE, render_acl().encode(), 0o644, account)
        user = account.pw_name if account else pwd.getpwuid(os.geteuid()).pw_name
        conf = render_config(
            port=self._port,
            user=user,
            autosave_interval_s=self.autosave_interval_s,
            verbose=self.verbose,
            extra_conf=self.extra_conf,
            ws_port=self._ws_port or None,
        )
        install_file(self.conf_path, conf.encode(), 0o644, account)
        if account is not None:  # mosquitto writes its log and persistence here after dropping root
            for path in (self.run_dir, *self.run_dir.rglob("*")):
                os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)

    def _spawn(self) -> None:
        self._write_files()
        with (self.run_dir / OUT_FILE).open("wb") as out:
            self._proc = subprocess.Popen(
                [str(self._exe), "-c", CONF_FILE],
                cwd=self.run_dir,  # relative paths: mosquitto needs no access to the directories above
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # fires when the *thread* that started us exits
            )
        (self.run_dir / PID_FILE).write_text(f"{self._proc.pid}\n")

    def _output(self) -> str:
        out = (self.run_dir / OUT_FILE).read_text(errors="replace") if (self.run_dir / OUT_FILE).exists() else ""
        return out + self.log_text()

    def _wait_ready(self) -> None:
        ctx = tls_context(self.pki.backend)
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                raise BrokerError(f"mosquitto exited with {code} while starting:\n{self._output()[-2000:]}")
            try:
                with (
                    socket.create_connection((LOOPBACK, self._port), timeout=1.0) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost"),
                ):
                    pass
                if self._ws_port:  # libwebsockets opens its socket after the TCP listener
                    socket.create_connection((LOOPBACK, self._ws_port), timeout=1.0).close()
                return
            except OSError as exc:  # refused until it listens; ssl.SSLError is an OSError too
                last = exc
                time.sleep(POLL_S)
        raise BrokerError(f"mosquitto did not accept TLS on port {self._port} within {START_TIMEOUT_S:.0f}s: {last}")

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / PID_FILE).unlink()
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
            raise BrokerError(f"mosquitto (pid {proc.pid}) ignored {sig.name} and was killed") from None
