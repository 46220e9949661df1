"""Executing cloud commands exactly once, and reporting every outcome signed (docs/commands.md).

The uplink thread hands each message on the commands topic to ``submit()``; one worker
thread (``run()``) does the rest, so a slow command never stalls the link:

    agent.wire.inbound.classify (size, signature checked once, shape, target) -> journal lookup (a known id: the stored
    result is sent again, nothing runs) -> expiry rule -> envelope kept in
    ``<state>/commands/pending/`` -> journal *started* -> execute -> signed result into the
    results outbox -> journal *done* with the result -> envelope dropped.

Results are COSE_Sign1 by the device key over ``agent.wire.result.encode_result(...)``. They wait in
``<state>/commands/results/`` until the broker's PUBACK, so a result made while the link is
down, or just before a crash, is still delivered (the backend keeps the first per id).

At start-up, commands the journal shows as started were cut off by a crash. Idempotent ones
(``IDEMPOTENT``) run once more from their kept envelope, unless they expired meanwhile;
``reboot`` is reported done ("rebooted"); ``renew_certificate`` is done if its swap was
committed, else failed; the rest are reported failed, code ``interrupted``.

Every refusal is logged and answered with a signed result; nothing here stops the agent.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import queue
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.buffer.intake import Recorder
from agent.buffer.store import CLINICAL, CommandJournal, Store
from agent.clock import Clock, ClockQuality
from agent.config import SCHEMA, SETTABLE_KEYS, Config, build_config
from agent.errors import CommandRejected, ConfigError, GlucoagentError, LinkError, StoreError
from agent.fsutil import atomic_write
from agent.identity import recovery, renewal
from agent.identity.credentials import KEY_FILE, DeviceIdentity, load_key
from agent.identity.signer import Signer
from agent.identity.wipe import wipe_state
from agent.link.uplink import Uplink
from agent.meters import MeterWatcher
from agent.uci import parse_uci, set_option
from agent.wire import cose
from agent.wire.command import CLOCK_SKEW_S, MAX_COMMAND_BYTES, MAX_LIFETIME_S, Command, check_expiry
from agent.wire.inbound import Inbound, Refusal, classify
from agent.wire.renewal import REQUEST_CODE, Delivery
from agent.wire.result import encode_result

log = logging.getLogger(__name__)

COMMANDS_DIR = "commands"
PENDING_DIR = "pending"  # envelopes of started commands (to re-run idempotent ones after a crash)
INBOX_DIR = "inbox"  # messages stored before the broker gets its PUBACK, until the worker took them
RESULTS_DIR = "results"  # signed results awaiting the broker's PUBACK
DEPROVISION_MARK = "deprovision"
SELF_RENEWAL_MARK = ".selfrenew"  # pending/<request id>.selfrenew: the kid in use when the box started a renewal
# Run once more after a crash cut them off. Not sync_time: after a crash (maybe a reboot) the box cannot
# know how long ago the cloud's time was taken, and setting a stale time marked "synced" is worse.
IDEMPOTENT = frozenset({"ping", "set_config", "read_now", "resend", "diagnostics"})
QUEUE_MAX = 64
MAX_UNKNOWN_RESULTS = 50  # refusals of unauthenticated messages kept waiting for the link
SCRIPT_TIMEOUT_S = 120.0
REBOOT_GRACE_S = 60.0  # the reboot command returned 0: the box should go down within this
RENEW_TIMEOUT_S = 60.0  # for the certificate delivery
DELIVER_BEFORE_WIPE_S = 10.0
PRUNE_EVERY_S = 86_400.0
LOG_RING_LINES = 500
LOG_LINE_MAX = 300

# Options applied to the running agent; any other settable option is persisted and needs a restart.
HOT_OPTIONS = frozenset(
    {
        "agent.log_level",
        "agent.health_interval_s",
        "agent.port_scan_s",
        "agent.reread_s",
        "mqtt.batch_records",
        "mqtt.inflight",
        "mqtt.max_payload",
        "mqtt.ack_timeout_s",
        "mqtt.stable_s",
        "buffer.max_records",
        "buffer.retention_s",
        "alerts.hypo_mgdl",
        "alerts.severe_hypo_mgdl",
        "alerts.hyper_mgdl",
    }
)


class Host(Protocol):
    """What the executor needs of the daemon (agent/daemon.py ``Daemon`` fits)."""

    cfg: Config
    identity: DeviceIdentity
    clock: Clock
    store: Store
    signer: Signer
    recorder: Recorder
    uplink: Uplink
    watcher: MeterWatcher

    def health_sample(self) -> dict[str, str | int | float | bool]: ...

    def stop(self, *_: Any) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # ok | failed | refused | pending
    code: str
    message: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- log ring for `diagnostics` -------------------------------------------------------------------
_PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.DOTALL)
_SECRET_RE = re.compile(r"(?i)\b(token|patient|password|secret|private[_ ]?key)(\s*[=:]\s*|\s+)\S+")


def redact(line: str) -> str:
    """No key material, token or patient reference leaves the box in a log excerpt."""
    line = _PEM_RE.sub("[redacted PEM]", line)
    return _SECRET_RE.sub(r"\1\2[redacted]", line)[:LOG_LINE_MAX]


class LogRing(logging.Handler):
    """The last log lines, in memory only (no flash writes), redacted as they are recorded."""

    def __init__(self, capacity: int = LOG_RING_LINES) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(redact(self.format(record)))
        except Exception:  # a logging handler must never raise
            self.handleError(record)

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:]


# --- the results outbox ---------------------------------------------------------------------------
class ResultOutbox:
    """Signed results as files, published in order and removed on PUBACK (or kept for the next link)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in folder.glob("*.cose"))
        self._next = int(names[-1].split("-", 1)[0]) + 1 if names else 1
        self._link: object = None
        self._inflight: dict[str, int] = {}
        self._work = True  # files may be left from before a restart; cleared once the folder is empty

    def put(self, cmd_id: str, payload: bytes) -> None:
        if not cmd_id and len(list(self.folder.glob("*-.cose"))) >= MAX_UNKNOWN_RESULTS:
            log.warning("results outbox: too many refusals waiting; this one is only logged")
            return
        atomic_write(self.folder / f"{self._next:012d}-{cmd_id}.cose", payload, mode=0o600)
        self._next += 1
        self._work = True

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.cose")))

    def flush(self, uplink: Uplink) -> None:
        """Uplink thread, every loop pass: cheap when there is nothing to send."""
        link = uplink.link
        if not self._work or link is None or not link.connected:
            return
        if link is not self._link:  # a new connection: nothing published on the old one counts
            self._link, self._inflight = link, {}
        for path in sorted(self.folder.glob("*.cose")):
            mid = self._inflight.get(path.name)
            try:
                if mid is None:
                    self._inflight[path.name] = link.publish(uplink.topics.results, path.read_bytes())
                    continue
                ok = link.acked(mid)
            except (LinkError, OSError) as exc:
                log.debug("results outbox: %s", exc)
                return
            if ok:
                path.unlink(missing_ok=True)
                del self._inflight[path.name]
            elif ok is False:
                del self._inflight[path.name]  # refused by the broker: publish again
        self._work = bool(self._inflight) or any(self.folder.glob("*.cose"))


@dataclasses.dataclass(slots=True)
class _Renewal:
    cmd_id: str
    event: threading.Event = dataclasses.field(default_factory=threading.Event)
    delivery: Delivery | None = None


class CommandExecutor:
    def __init__(self, host: Host, *, renewed: bool = False) -> None:
        self.host = host
        self.state = host.cfg.agent.state_dir
        self.device_id = host.identity.device_id
        self.journal = CommandJournal(host.store)
        base = self.state / COMMANDS_DIR
        self.pending_dir = base / PENDING_DIR
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.inbox_dir = base / INBOX_DIR
        self.inbox_dir.mkdir(parents=True, exist_ok=True)
        # Taken before any thread runs: a message arriving during recovery is handled once, by the worker.
        self._leftover = sorted(self.inbox_dir.glob("*.cose"))
        self.outbox = ResultOutbox(base / RESULTS_DIR)
        # Only the uplink thread touches the MQTT client: it flushes the outbox on every loop pass.
        host.uplink.add_tick(lambda: self.outbox.flush(host.uplink))
        host.uplink.add_tick(self._relink_after_renewal)
        self.deprovision_mark = base / DEPROVISION_MARK
        self.ring = LogRing()
        logging.getLogger().addHandler(self.ring)
        self._renewed_at_start = renewed
        self._queue: queue.Queue[tuple[bytes, float, Path | None, Inbound]] = queue.Queue(maxsize=QUEUE_MAX)
        self._stop = threading.Event()
        self._renewal: _Renewal | None = None
        self._self_renewal: str | None = None  # "renew" | "recover", asked for by the daemon's RenewalSchedule
        self.schedule = renewal.RenewalSchedule(
            renewal.cert_not_after(host.identity.cert_path), host.cfg.agent.renew_before_days * 86_400.0
        )
        self._relink = False
        self._wipe = False
        self._next_prune = 0.0
        self.handlers: dict[str, Callable[[Command, float], Outcome | None]] = {
            "ping": self._ping,
            "sync_time": self._sync_time,
            "set_config": self._set_config,
            "read_now": self._read_now,
            "resend": self._resend,
            "renew_certificate": self._renew_certificate,
            "diagnostics": self._diagnostics,
            "deprovision": self._deprovision,
            "reboot": self._reboot,
        }

    # --- threads -------------------------------------------------------------------------------
    def submit(self, payload: bytes) -> bool:
        """Uplink thread: store and queue a message for the worker (a certificate delivery goes straight
        to its waiter). False when it could not be stored: then it must not be acknowledged to the broker."""
        inbound = classify(payload, self.host.identity.command_key, self.device_id)  # the one signature check
        pending = self._renewal
        if pending is not None and isinstance(inbound, Delivery) and inbound.renewal == pending.cmd_id:
            pending.delivery = inbound
            pending.event.set()
            return True
        stored = self._store_incoming(payload)
        if stored is None and len(payload) <= MAX_COMMAND_BYTES:
            return False  # not durable: leave it unacknowledged, the broker redelivers after a reconnect
        try:
            self._queue.put_nowait((payload, time.monotonic(), stored, inbound))
        except queue.Full:
            log.error("command queue full: a message of %d bytes waits in the inbox for the next start", len(payload))
        return True

    def _store_incoming(self, payload: bytes) -> Path | None:
        """Make the message durable before its PUBACK goes out (the caller returns only after this).

        Messages too big to be a command are refused anyway and not worth a flash write.
        """
        if len(payload) > MAX_COMMAND_BYTES:
            return None
        path = self.inbox_dir / f"{time.time_ns():020d}.cose"
        try:
            atomic_write(path, payload)
        except GlucoagentError as exc:
            log.error("command could not be stored before its acknowledgement: %s", exc)
            return None
        return path

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Worker thread: recover what a crash cut off, then serve the queue and the results outbox."""
        try:
            self.recover()
        except Exception:
            log.exception("command recovery failed; serving new commands anyway")
        while not self._stop.is_set():
            try:
                payload, received, stored, inbound = self._queue.get(timeout=0.2)
            except queue.Empty:
                payload, stored = b"", None
            try:
                if payload:
                    self.handle(payload, received, inbound)
                    if stored is not None:  # journaled (or refused) now: the inbox copy has done its job
                        stored.unlink(missing_ok=True)
                if self._self_renewal is not None:
                    self._renew_by_itself()
                self._prune()
            except Exception:  # the worker must outlive any bug in one command
                log.exception("command worker: unexpected error")

    def after_stop(self) -> None:
        """Daemon, after every thread stopped and the buffer closed: a deprovision wipes the box now."""
        if self._wipe:
            wipe_state(self.host.cfg)
            log.warning("deprovisioned: key, certificate and buffer wiped from %s", self.state)

    # --- one message ------------------------------------------------------------------------------
    def handle(self, payload: bytes, received: float | None = None, inbound: Inbound | None = None) -> None:
        """One message; ``inbound`` is its classification when the uplink thread made it already."""
        received = time.monotonic() if received is None else received
        cmd = classify(payload, self.host.identity.command_key, self.device_id) if inbound is None else inbound
        if isinstance(cmd, Delivery):
            log.warning("certificate delivery with no renewal waiting for it: ignored")
            return
        if isinstance(cmd, Refusal):
            self._refuse(payload, cmd.error, cmd.cmd_id or None)
            return
        known = self.journal.lookup(cmd.id)
        if known is not None:
            state, result = known
            if state == "done" and result is not None:
                log.warning(
                    "command %s (%s) replayed: not executed again, its stored result is sent again", cmd.id, cmd.type
                )
                self.outbox.put(cmd.id, result)
                self.host.uplink.wake()
            else:
                log.warning("command %s (%s) arrived again while it runs: ignored", cmd.id, cmd.type)
            return
        try:
            check_expiry(
                cmd, wall=time.time(), clock_trusted=self._clock_trusted(), cloud_floor=self.journal.cloud_floor()
            )
        except CommandRejected as exc:
            self._refuse(payload, exc, cmd.id)
            return
        try:
            atomic_write(self.pending_dir / f"{cmd.id}.cose", payload)
            self.journal.start(cmd.id, cmd.type, cmd.issued_at, now=max(time.time(), cmd.issued_at))
        except StoreError as exc:
            log.error("command %s (%s) not journaled, so not run: %s", cmd.id, cmd.type, exc)
            self._report(cmd.id, Outcome("failed", "storage_unavailable", f"cannot journal the command: {exc}"))
            return
        log.info("command %s (%s) started", cmd.id, cmd.type)
        self._run(cmd, received)

    def _run(self, cmd: Command, received: float) -> None:
        try:
            outcome = self.handlers[cmd.type](cmd, received)
        except CommandRejected as exc:
            outcome = Outcome("refused", exc.code, str(exc))
        except (GlucoagentError, OSError, subprocess.SubprocessError) as exc:
            outcome = Outcome("failed", "error", str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("command %s (%s) crashed", cmd.id, cmd.type)
            outcome = Outcome("failed", "internal_error", type(exc).__name__)
        if outcome is None:  # a reboot under way: the journal keeps it started; the next start reports it
            return
        self._finish(cmd.id, cmd.type, outcome)

    def _finish(self, cmd_id: str, ctype: str, outcome: Outcome) -> None:
        result = self._sign(cmd_id, outcome)
        self.outbox.put(cmd_id, result)
        self.host.uplink.wake()
        self.journal.finish(cmd_id, result)
        (self.pending_dir / f"{cmd_id}.cose").unlink(missing_ok=True)
        level = logging.INFO if outcome.status == "ok" else logging.WARNING
        log.log(level, "command %s (%s) %s: %s (%s)", cmd_id, ctype, outcome.status, outcome.code, outcome.message)

    def _sign(self, cmd_id: str, outcome: Outcome) -> bytes:
        body = encode_result(cmd_id, self.device_id, outcome.status, outcome.code, outcome.message, outcome.data)
        return self.host.signer.sign_payload(body)

    def _report(self, cmd_id: str, outcome: Outcome) -> None:
        self.outbox.put(cmd_id, self._sign(cmd_id, outcome))
        self.host.uplink.wake()

    def _refuse(self, payload: bytes, exc: CommandRejected, cmd_id: str | None = None) -> None:
        digest = hashlib.sha256(payload).hexdigest()[:16]
        log.warning("command %s refused (%s): %s", cmd_id or f"<unknown, sha256 {digest}>", exc.code, exc)
        self._report(cmd_id or "", Outcome("refused", exc.code, str(exc), {"sha256": digest}))

    def _clock_trusted(self) -> bool:
        return self.host.clock.quality() is not ClockQuality.UNSET

    def _prune(self) -> None:
        """Forget done commands so old that any replay of them is expired by the cloud time floor."""
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        floor = self.journal.cloud_floor()
        if floor:
            n = self.journal.prune(floor - MAX_LIFETIME_S - CLOCK_SKEW_S)
            if n:
                log.info("command journal: %d old entries pruned", n)

    # --- start-up recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        if self.deprovision_mark.exists():
            log.warning("a deprovision was committed before the agent stopped: finishing it")
            self._finish_deprovision()
            return
        for cmd_id, ctype in self.journal.interrupted():
            envelope = self.pending_dir / f"{cmd_id}.cose"
            log.warning("command %s (%s) was cut off by a stop or crash", cmd_id, ctype)
            if ctype == "reboot":
                self._finish(cmd_id, ctype, Outcome("ok", "rebooted", "the box restarted"))
            elif ctype == "renew_certificate" and (self._renewed_at_start or self._key_changed_since(cmd_id)):
                self._finish(cmd_id, ctype, Outcome("ok", "renewed", "new key and certificate in place"))
            elif ctype in IDEMPOTENT and envelope.exists():
                self._rerun(cmd_id, ctype, envelope.read_bytes())
            else:
                self._finish(cmd_id, ctype, Outcome("failed", "interrupted", "the agent stopped while it ran"))
        for mark in self.pending_dir.glob(f"*{SELF_RENEWAL_MARK}"):  # renewals the box started by itself
            request_id = mark.name.removesuffix(SELF_RENEWAL_MARK)
            if self._key_changed_since(request_id, mark):
                log.warning("renewal %s was swapped in before the agent stopped: reporting it", request_id)
                self._report(request_id, Outcome("ok", "renewed", "new key and certificate in place"))
            mark.unlink(missing_ok=True)
        for kid_file in self.pending_dir.glob("*.kid"):  # renewal bookkeeping: only needed above
            kid_file.unlink(missing_ok=True)
        for orphan in self.pending_dir.glob("*.cose"):  # written just before a crash, never started
            if self.journal.lookup(orphan.stem) is None:
                orphan.unlink(missing_ok=True)
        for stored in self._leftover:  # acknowledged to the broker before the last stop, never handled
            log.warning("handling a command received before the last stop: %s", stored.name)
            self.handle(stored.read_bytes())  # the journal turns one already handled into a replay
            stored.unlink(missing_ok=True)

    def _key_changed_since(self, cmd_id: str, mark: Path | None = None) -> bool:
        """True when the live device key is not the one recorded when renewal ``cmd_id`` started."""
        try:
            before = (mark or self.pending_dir / f"{cmd_id}.kid").read_text().strip()
            live = cose.key_id(load_key(self.state / KEY_FILE).public_key()).hex()
        except (OSError, GlucoagentError):
            return False
        return before != live

    def _rerun(self, cmd_id: str, ctype: str, envelope: bytes) -> None:
        cmd = classify(envelope, self.host.identity.command_key, self.device_id)
        try:
            if isinstance(cmd, Refusal):
                raise cmd.error
            if not isinstance(cmd, Command):  # a kept envelope is always a command; a delivery is never kept
                raise CommandRejected("malformed", "a certificate delivery, not a command")  # noqa: TRY301
            check_expiry(
                cmd, wall=time.time(), clock_trusted=self._clock_trusted(), cloud_floor=self.journal.cloud_floor()
            )
        except CommandRejected as exc:
            self._finish(cmd_id, ctype, Outcome("failed", "interrupted", f"not run again: {exc}"))
            return
        log.info("command %s (%s) is idempotent: running it once more", cmd_id, ctype)
        self._run(cmd, time.monotonic())

    # --- the commands ---------------------------------------------------------------------------
    def _ping(self, _cmd: Command, _received: float) -> Outcome:
        return Outcome(
            "ok",
            "pong",
            "agent running",
            {"agent": __version__, "clock": self.host.clock.quality().value, "connected": self.host.uplink.connected},
        )

    def _sync_time(self, cmd: Command, received: float) -> Outcome:
        epoch = float(cmd.args["time"]) + (time.monotonic() - received)  # time spent queued on the box
        before = time.time()
        argv = shlex.split(self.host.cfg.agent.settime_command.replace("{epoch}", str(int(epoch))))
        proc = _run_script(argv)
        if proc.returncode != 0:
            return Outcome("failed", "settime_failed", f"{argv[0]} exited {proc.returncode}: {_tail(proc)}")
        self.host.clock.trusted = True
        return Outcome(
            "ok", "time_set", f"clock set to {int(epoch)}", {"time": int(epoch), "offset_s": round(epoch - before, 3)}
        )

    def _set_config(self, cmd: Command, _received: float) -> Outcome:
        key, value = str(cmd.args["key"]), str(cmd.args["value"])
        if key not in SETTABLE_KEYS:
            raise CommandRejected("not_settable", f"{key} cannot be set remotely")
        section, option = key.split(".", 1)
        try:
            SCHEMA[section][option](value)
        except ValueError as exc:
            raise CommandRejected("bad_value", f"{key}: {exc}") from None
        path = Path(self.host.cfg.source)
        if not path.is_file():
            return Outcome("failed", "no_config_file", "the agent runs without a configuration file to persist to")
        text = path.read_text(encoding="utf-8")
        try:
            new_text = set_option(text, section, option, value, source=str(path), create_type=section)
            build_config(parse_uci(new_text, source=str(path)), str(path))  # the whole file must stay valid
        except ConfigError as exc:
            raise CommandRejected("bad_value", str(exc)) from None
        atomic_write(path, new_text.encode("utf-8"), mode=path.stat().st_mode & 0o777)
        if key not in HOT_OPTIONS:
            return Outcome(
                "ok", "restart_required", f"{key} saved; it takes effect after a restart", {"restart_required": True}
            )
        self._apply(section, option, SCHEMA[section][option](value))
        return Outcome("ok", "applied", f"{key} saved and applied", {"restart_required": False})

    def _apply(self, section: str, option: str, value: Any) -> None:
        """Hot-apply one option to the running agent (only the option itself changes in memory)."""
        h = self.host
        cfg = dataclasses.replace(h.cfg, **{section: dataclasses.replace(getattr(h.cfg, section), **{option: value})})
        h.cfg = h.uplink.cfg = h.watcher.cfg = cfg
        h.recorder.limits = cfg.alerts
        h.store.max_records = cfg.buffer.max_records
        h.store.retention_s = cfg.buffer.retention_s
        logging.getLogger().setLevel(cfg.agent.log_level.upper())

    def _read_now(self, _cmd: Command, _received: float) -> Outcome:
        self.host.watcher.read_now()
        present = sum(1 for s in self.host.watcher.ports.values() if s.present)
        return Outcome("ok", "scheduled", f"read requested on {present} attached port(s)", {"ports": present})

    def _resend(self, cmd: Command, _received: float) -> Outcome:
        first, last = int(cmd.args["first"]), int(cmd.args["last"])
        n = self.host.store.requeue(CLINICAL, first, last)
        if n:
            self.host.uplink.wake()
            return Outcome("ok", "requeued", f"{n} record(s) {first}..{last} queued for upload again", {"requeued": n})
        if self.host.store.retained(CLINICAL, first, last, 1):
            return Outcome(
                "ok", "already_pending", f"records {first}..{last} are still waiting for upload", {"requeued": 0}
            )
        return Outcome(
            "failed", "not_retained", f"no record {first}..{last} is kept on the box any more", {"requeued": 0}
        )

    def _diagnostics(self, cmd: Command, _received: float) -> Outcome:
        lines = int(cmd.args.get("lines", 50))
        up = self.host.uplink.stats()
        data = {
            "agent": __version__,
            "health": self.host.health_sample(),
            "uplink": {k: v for k, v in up.items() if isinstance(v, int | float | bool) or v is None},
            "conditions": sorted(self.host.store.conditions()),
            "ports": [
                {"port": s.port.port, "present": s.present, "failures": s.failures}
                for s in self.host.watcher.ports.values()
            ],
            "log": self.ring.tail(lines),
        }
        return Outcome("ok", "snapshot", f"health snapshot and the last {len(data['log'])} log line(s)", data)

    def _deprovision(self, cmd: Command, _received: float) -> Outcome | None:
        unsent = self.host.store.stats().pending_clinical
        if unsent and not cmd.args.get("force", False):
            return Outcome(
                "failed", "unsent_readings", f"{unsent} readings are not uploaded yet; refusing (force=true wipes them)"
            )
        outcome = Outcome(
            "ok",
            "deprovisioned",
            "key, certificate and buffer will be wiped; the agent stops",
            {"wiped_unsent": unsent},
        )
        atomic_write(self.deprovision_mark, b"wipe\n")  # from here on the wipe happens, even after a crash
        self._finish(cmd.id, cmd.type, outcome)
        self._finish_deprovision()
        return None

    def _finish_deprovision(self) -> None:
        deadline = time.monotonic() + DELIVER_BEFORE_WIPE_S  # let the result leave before the key is gone
        self.host.uplink.wake()
        while len(self.outbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._wipe = True
        self._stop.set()
        self.host.stop()

    def _reboot(self, _cmd: Command, _received: float) -> Outcome | None:
        argv = shlex.split(self.host.cfg.agent.reboot_command)
        proc = _run_script(argv)
        if proc.returncode != 0:
            return Outcome("failed", "reboot_failed", f"{argv[0]} exited {proc.returncode}: {_tail(proc)}")
        log.warning("reboot command accepted; waiting for the box to go down")
        if self._stop.wait(REBOOT_GRACE_S):
            return None  # going down: the next start reports it
        return Outcome(
            "failed", "no_reboot", f"{argv[0]} returned but the box did not restart within {REBOOT_GRACE_S:.0f}s"
        )

    def _renew_certificate(self, cmd: Command, _received: float) -> Outcome:
        # The key in use before: after a crash, a different live key proves the swap happened.
        atomic_write(self.pending_dir / f"{cmd.id}.kid", self.host.signer.kid.hex().encode())
        try:
            leaf = self._exchange(cmd.id, "csr", "new key made; waiting for its certificate", {})
        except renewal.RenewalError as exc:
            return Outcome("failed", exc.code, f"{exc}; the old credentials stay in use")
        summary = renewal.certificate_summary(leaf)
        self.schedule.succeeded(float(summary["not_after"]), time.time(), time.monotonic())  # the next due date
        return Outcome("ok", "renewed", "new key and certificate in place (the link moves to them now)", summary)

    def _exchange(self, request_id: str, code: str, message: str, data: dict[str, Any]) -> Any:
        """Stage a key, send its CSR in a pending result signed with the current key, take the delivered
        certificate, log in with it, swap. Returns the new leaf; raises RenewalError (old pair kept)."""
        h = self.host
        key, csr = renewal.stage_key(self.state, h.cfg.agent.key_type)
        pending = _Renewal(request_id)
        self._renewal = pending
        try:
            self._report(request_id, Outcome("pending", code, message, {**data, "csr": csr}))
            delivery = self._await_delivery(pending)
            ca_pem = h.identity.ca_path.read_bytes()
            leaf = renewal.check_certificate(delivery.cert_pem, key, self.device_id, ca_pem)
            renewal.try_login(self.state, h.uplink.settings, delivery.cert_pem)
            renewal.commit(self.state)
        except renewal.RenewalError:
            renewal.discard(self.state)
            raise
        finally:
            self._renewal = None
        self._use_key(key)
        return leaf

    def _use_key(self, key: cose.PrivateKey, *, relink: bool = True) -> None:
        """The swapped-in key signs from now on, and a running link reconnects with the new certificate."""
        h = self.host
        signer = Signer(self.device_id, key, cose.key_id(key.public_key()), h.clock)
        h.signer = h.recorder.signer = signer  # one reference swap: key and kid change together
        self._relink = relink

    def _relink_after_renewal(self) -> None:
        """Uplink thread: once the signed results are out, drop the link; it comes back with the new pair,
        so the old certificate (which the cloud revokes now) is no longer in use anywhere."""
        link = self.host.uplink.link
        if self._relink and not len(self.outbox) and link is not None and link.connected:
            self._relink = False
            log.info("certificate renewed: reconnecting with the new certificate")
            link.close()

    # --- renewals the box starts by itself (agent/identity/renewal.py RenewalSchedule) ---------------------
    def start_renewal(self, kind: str) -> None:
        """Daemon thread: have the worker renew (``renew``) or re-enrol over the claim path (``recover``)."""
        self._self_renewal = kind

    def _renew_by_itself(self) -> None:
        kind, self._self_renewal = self._self_renewal, None
        h, schedule = self.host, self.schedule
        request_id = renewal.new_request_id()
        mark = self.pending_dir / f"{request_id}{SELF_RENEWAL_MARK}"
        atomic_write(mark, h.signer.kid.hex().encode())  # as for the command: a crash after the swap is reported
        days = (schedule.not_after - time.time()) / 86_400
        settled, code = False, ""
        try:
            if kind == "recover":
                log.warning(
                    "the device certificate expired %.1f days ago (the box was offline): re-enrolling over the "
                    "claim path with proof of the old key; device id, patient and unsent readings are kept", -days
                )
                leaf = recovery.recover(
                    self.state, h.uplink.settings, self.device_id, h.signer.key, h.cfg.agent.key_type,
                    stop=self._stop.is_set,
                )  # fmt: skip
                self._use_key(load_key(self.state / KEY_FILE), relink=False)  # the link is down: no relink
                code = "recovered"
            else:
                log.info("the device certificate expires in %.1f days: asking the cloud for a new one", days)
                leaf = self._exchange(
                    request_id, REQUEST_CODE, f"certificate expires in {days:.1f} days",
                    {"not_after": int(schedule.not_after)},
                )  # fmt: skip
                code = "renewed"
            summary = renewal.certificate_summary(leaf)
            self._report(request_id, Outcome("ok", code, "new key and certificate in place", summary))
            mark.unlink(missing_ok=True)
            schedule.succeeded(float(summary["not_after"]), time.time(), time.monotonic())
            settled = True
            log.info("certificate %s: serial %s, valid until %s", code, summary["serial"], summary["not_after"])
        except (GlucoagentError, OSError) as exc:  # RenewalError and the rest: the old pair stays in use
            code = str(getattr(exc, "code", type(exc).__name__))
            if kind == "recover" and code in renewal.RECOVERY_REFUSALS:
                log.error("the cloud refused to re-enrol this box (%s): %s; it needs a technician", code, exc)
            else:
                log.warning("certificate %s failed (%s): %s", kind, code, exc)
        finally:
            if not settled:  # never left busy, whatever went wrong: the schedule tries again later
                mark.unlink(missing_ok=True)
                quick = kind == "recover" and code not in renewal.RECOVERY_REFUSALS  # e.g. broker still unreachable
                cap = renewal.RECOVER_RETRY_MAX_S if quick else renewal.RETRY_MAX_S
                log.info("next certificate %s attempt in %.0f s", kind, schedule.failed(time.monotonic(), cap))

    def _await_delivery(self, pending: _Renewal) -> Delivery:
        """Publish the CSR (via the outbox) and wait for the certificate delivery ``submit`` routes here."""
        deadline = time.monotonic() + RENEW_TIMEOUT_S
        self.host.uplink.wake()
        while not pending.event.wait(0.1):
            if time.monotonic() > deadline or self._stop.is_set():
                raise renewal.RenewalError("renewal_timeout", f"no certificate within {RENEW_TIMEOUT_S:.0f}s")
        if pending.delivery is None:
            raise renewal.RenewalError("renewal_timeout", "woken without a certificate")
        return pending.delivery


def _run_script(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=SCRIPT_TIMEOUT_S, check=False)


def _tail(proc: subprocess.CompletedProcess[bytes]) -> str:
    return redact((proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip()[-200:])
