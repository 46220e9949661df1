"""A real mosquitto for tests and ``make demo``: mutual TLS only, client ids bound, pattern ACLs, persistence.

``Broker`` writes ``mosquitto.conf``, ``acl``, a copy of the TLS files (``tls/``) and of the
auth plugin into a run directory and runs ``mosquitto -c mosquitto.conf`` there, as a child
process on a free loopback port; every path in the config is relative to that directory, so
mosquitto needs no access to the directories above it. Started as root, mosquitto drops to
user ``mosquitto`` right after reading its config; the run directory is then its own (0700),
the key copy 0600. The listener is TLS only (TLS 1.2 minimum) and requires a client certificate
signed by the fleet CA and not on the CRL. The plugin (backend/mosquitto/glucoagent_auth.c,
built by ``make setup``) binds the client id to the certificate CN and makes the CN the MQTT
user name, and the ACL below confines each identity (see docs/security.md):

    device <id>  write gluco/v1/dev/<id>/{telemetry,status,health,results}
                 read  gluco/v1/dev/<id>/{acks,commands}
    claim        write gluco/v1/prov/+/request, read gluco/v1/prov/+/response
    backend      readwrite gluco/v1/#

    client ids   device <id>: <id>, or <id>-renew / <id>-check (the box's side connections);
                 claim: claim-<anything>; backend: backend-<anything>

``tls_client`` builds a paho client (2.x API) that pins the fleet CA and checks the
broker's host name, as the agent does. ``reload_broker`` (CRL refresh, revoke) and
``disconnect_identity`` (revoke) work from another process too: the broker's pid is in
``mosquitto.pid`` in its run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.errors import GlucoagentError
from agent.wire import topics
from backend.pki import BACKEND_CN, CLAIM_CN, ClientCreds, FleetPki

__all__ = [
    "Broker",
    "BrokerError",
    "ClientCreds",
    "CrlKeeper",
    "client_id_for",
    "disconnect_identity",
    "find_auth_plugin",
    "find_mosquitto",
    "reload_broker",
    "render_acl",
    "render_config",
    "tls_client",
    "tls_context",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
REPO = Path(__file__).resolve().parent.parent
AUTH_PLUGIN_ENV = "GLUCOAGENT_AUTH_PLUGIN"
AUTH_PLUGIN_BUILT = REPO / "build" / "glucoagent_auth.so"  # `make setup` builds it there
AUTH_PLUGIN_FILE = "glucoagent_auth.so"
BROKER_USER = "mosquitto"  # Debian's mosquitto package creates it; mosquitto drops to it when started as root
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.01
CONF_FILE = "mosquitto.conf"
ACL_FILE = "acl"
LOG_FILE = "mosquitto.log"
OUT_FILE = "mosquitto.out"  # stdout/stderr: errors before the log file is open
PERSIST_DIR = "persistence"
TLS_DIR = "tls"
PID_FILE = "mosquitto.pid"
RELOAD_MARKER = "Reloading config."
MAX_QUEUED_MESSAGES = 1_000_000
# The agent's largest PUBLISH payload (mqtt.max_payload, default 128 KiB) plus 1 KiB for the rest of
# the packet: fixed header (<= 5 bytes), topic (<= 2 + 87 bytes: gluco/v1/dev/<64-char id>/telemetry),
# packet id (2) and properties (the agent sends none on PUBLISH). mosquitto counts the whole packet.
AGENT_MAX_PAYLOAD = 131_072
MAX_PACKET_SIZE = AGENT_MAX_PAYLOAD + 1024

# Client-id rules the auth plugin enforces (backend/mosquitto/glucoagent_auth.c reads them from the config).
CLAIM_CLIENT_PREFIX = "claim-"  # agent/provisioning.py: claim-<request id>
BACKEND_CLIENT_PREFIX = "backend-"  # backend/service.py link_settings: backend-<random>
SIDE_SUFFIXES = ("renew", "check")  # agent/renewal.py <id>-renew, agent/status.py <id>-check
CONTROL_TOPIC = "$CONTROL/glucoagent/v1/disconnect"  # payload: an identity (CN) to disconnect everywhere

DEVICE_WRITE = (topics.TELEMETRY, topics.STATUS, topics.HEALTH, topics.RESULTS)
DEVICE_READ = (topics.ACKS, topics.COMMANDS)
_PR_SET_PDEATHSIG = 1


class BrokerError(GlucoagentError):
    """mosquitto is missing, did not start, or did not stop."""

    exit_code = 81


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


def client_id_for(cn: str) -> str:
    """A client id the broker accepts for the certificate named ``cn`` (tests, taps, tools)."""
    if cn == CLAIM_CN:
        return f"{CLAIM_CLIENT_PREFIX}{secrets.token_hex(6)}"
    if cn == BACKEND_CN:
        return f"{BACKEND_CLIENT_PREFIX}{secrets.token_hex(6)}"
    return cn


def render_acl() -> str:
    """The mosquitto ``acl_file``: named users first, then the per-device patterns.

    mosquitto applies ``pattern`` lines to *every* user, named ones included; ``%u`` is the
    user name, i.e. the certificate CN. So ``claim`` gets an explicit deny on the device
    tree, and the CA never issues a device certificate named ``claim`` or ``backend``
    (backend/pki.py). The acl_file never refuses a SUBSCRIBE (SUBACK is always granted):
    ``read`` is enforced per message at delivery, retained messages included.
    """
    dev = f"{topics.PREFIX}/dev/%u"
    prov = f"{topics.PREFIX}/prov/+"
    lines = [
        "# generated by backend/broker.py: each identity is the CN of its client certificate",
        f"user {BACKEND_CN}",
        f"topic readwrite {topics.PREFIX}/#",
        # '#' never matches a '$' topic: the plugin's disconnect command is the backend's alone.
        f"topic write {CONTROL_TOPIC}",
        "",
        f"user {CLAIM_CN}",
        # A user's own rules are checked before the patterns, and a deny match ends the check:
        # without this line the device patterns below would give 'claim' gluco/v1/dev/claim/...
        f"topic deny {topics.PREFIX}/dev/#",
        f"topic write {prov}/request",
        f"topic read {prov}/response",
        "",
        "# devices: CN = device id",
        *(f"pattern write {dev}/{leaf}" for leaf in DEVICE_WRITE),
        *(f"pattern read {dev}/{leaf}" for leaf in DEVICE_READ),
    ]
    return "\n".join(lines) + "\n"


def render_config(
    *,
    port: int,
    user: str,
    autosave_interval_s: int = 1,
    verbose: bool = False,
    extra_conf: Sequence[str] = (),
) -> str:
    """mosquitto.conf; every path is relative to the run directory, mosquitto's working directory."""
    log_types = ["all"] if verbose else ["error", "warning", "notice", "information", "subscribe", "unsubscribe"]
    lines = [
        "# generated by backend/broker.py; paths are relative to this directory (mosquitto's cwd)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {ACL_FILE}",
        # As root, mosquitto switches to this user right after reading this file; otherwise it is us.
        f"user {user}",
        "persistence true",
        f"persistence_location {PERSIST_DIR}",  # mosquitto 2.0 appends the '/' itself
        "persistence_file mosquitto.db",
        # Seconds between saves, so sessions and queued messages also survive a SIGKILL (mostly).
        f"autosave_interval {autosave_interval_s}",
        # A backlog drained to a slow subscriber must not be dropped (default 1000). Not 0 ("no limit"):
        # mosquitto 2.0.11 compares its outgoing packet count against this when it refuses a PUBLISH
        # and, with 0, disconnects every client whose publish the ACL denied.
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        # A larger packet closes the sender's connection; MQTT 5 clients are told the limit in CONNACK.
        f"max_packet_size {MAX_PACKET_SIZE}",
        "set_tcp_nodelay true",
        f"log_dest file {LOG_FILE}",
        *(f"log_type {t}" for t in log_types),
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        # Client id == certificate CN (see the module docstring); it also makes the CN the user name.
        f"plugin ./{AUTH_PLUGIN_FILE}",
        f"plugin_opt_backend_cn {BACKEND_CN}",
        f"plugin_opt_backend_prefix {BACKEND_CLIENT_PREFIX}",
        f"plugin_opt_claim_cn {CLAIM_CN}",
        f"plugin_opt_claim_prefix {CLAIM_CLIENT_PREFIX}",
        f"plugin_opt_side_suffixes {','.join(SIDE_SUFFIXES)}",
        f"plugin_opt_control_topic {CONTROL_TOPIC}",
        "",
        f"listener {port} {LOOPBACK}",
        f"cafile {TLS_DIR}/ca.crt",
        f"certfile {TLS_DIR}/server.crt",
        f"keyfile {TLS_DIR}/server.key",
        f"crlfile {TLS_DIR}/crl.pem",
        "tls_version tlsv1.2",
        "require_certificate true",
        # false: with true, mosquitto 2.0.11 skips every auth plugin, so nothing could bind the client id.
        "use_identity_as_username false",
        *extra_conf,
    ]
    return "\n".join(lines) + "\n"


def _broker_account() -> pwd.struct_passwd | None:
    """The account mosquitto runs as when we are root; None when we are not (it then runs as us)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(BROKER_USER)
    except KeyError:
        raise BrokerError(
            f"started as root, the broker drops to user {BROKER_USER!r}, which does not exist: "
            "run `make setup` (Debian's mosquitto package creates it)"
        ) from None


def _install(path: Path, data: bytes, mode: int, account: pwd.struct_passwd | None) -> None:
    """Atomically replace ``path`` (mode and owner set before the rename: a key is never exposed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.fchmod(fd, mode)
        if account is not None:
            os.fchown(fd, account.pw_uid, account.pw_gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _sync_crl(run_dir: Path, pki: FleetPki, account: pwd.struct_passwd | None) -> bool:
    """Copy the fleet CRL into the broker's TLS directory; True when the copy changed."""
    data = pki.crl_pem()
    target = run_dir / TLS_DIR / "crl.pem"
    if target.exists() and target.read_bytes() == data:
        return False
    _install(target, data, 0o644, account)
    return True


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
        _sync_crl(run_dir, pki, _broker_account())
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the broker if the process (thread) that started it dies, so no broker outlives a crashed test."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def tls_context(creds: ClientCreds) -> ssl.SSLContext:
    """Client TLS: TLS 1.2 or newer, only the fleet CA trusted, host name checked, our certificate offered."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(creds.ca))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return ctx


def tls_client(
    creds: ClientCreds, client_id: str, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
) -> mqtt.Client:
    """A paho 2.x client set up for the fleet broker's mutual TLS (not connected yet)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=False,
    )
    client.tls_set_context(tls_context(creds))
    return client


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
    ) -> None:
        """``extra_conf``: lines appended to mosquitto.conf; ``env``: added to mosquitto's environment (faketime)."""
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
            self._spawn()
            try:
                self._wait_ready()
                self._fixed_port = True  # from now on the port is ours: restart and start-after-kill keep it
            except BrokerError:
                lost_race = "Address already in use" in self._output()
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
        account = _broker_account()
        self.pki.refresh_crl_if_due()  # a CRL past its nextUpdate would refuse every client from the start
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tls = self.run_dir / TLS_DIR
        for d in (self.run_dir, self.run_dir / PERSIST_DIR, tls):
            d.mkdir(exist_ok=True)
            d.chmod(0o700)
        _install(tls / "ca.crt", self.pki.ca_path.read_bytes(), 0o644, account)
        _install(tls / "server.crt", self.pki.server_cert_path.read_bytes(), 0o644, account)
        _install(tls / "server.key", self.pki.server_key_path.read_bytes(), 0o600, account)
        _sync_crl(self.run_dir, self.pki, account)
        _install(self.run_dir / AUTH_PLUGIN_FILE, self._plugin.read_bytes(), 0o755, account)
        _install(self.run_dir / ACL_FILE, render_acl().encode(), 0o644, account)
        user = account.pw_name if account else pwd.getpwuid(os.geteuid()).pw_name
        conf = render_config(
            port=self._port,
            user=user,
            autosave_interval_s=self.autosave_interval_s,
            verbose=self.verbose,
            extra_conf=self.extra_conf,
        )
        _install(self.conf_path, conf.encode(), 0o644, account)
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
