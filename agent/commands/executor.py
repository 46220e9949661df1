"""Executing cloud commands exactly once, and reporting every outcome signed (docs/commands.md).

The one place for command state and its recovery. The uplink thread hands each message on the
commands topic to ``submit()``; one worker thread (``run()``) does the rest, so a slow command
never stalls the link:

    agent.wire.inbound.classify (size, signature checked once, shape, target) -> journal lookup (a known id: the stored
    result is sent again, nothing runs) -> expiry rule -> envelope kept in
    ``<state>/commands/pending/`` -> journal *started* -> handler (agent/commands/handlers.py) -> signed
    result into the results outbox (agent/commands/spool.py) -> journal *done* with the result -> envelope dropped.

At start-up (``recover``), each command the journal shows as started was cut off by a crash; its
handler's ``interrupted`` says what that means: run it once more from its kept envelope (unless it
expired meanwhile), report it ``interrupted``, or ask the live state (reboot: rebooted; renewal: is
the live key new; deprovision: is the wipe committed). Then self-renewals swapped just before the
crash are reported, a committed deprovision completes, and messages acknowledged to the broker but
never handled are handled (the journal turns one handled already into a replay).

Every refusal is logged and answered with a signed result; nothing here stops the agent but a deprovision.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from pathlib import Path

from agent.buffer.journal import CommandJournal
from agent.buffer.store import Store
from agent.clock import Clock, ClockQuality
from agent.commands.handlers import HANDLERS
from agent.commands.logring import LogRing
from agent.commands.ports import INTERRUPTED, Context, Host, Interruption, Link, Outcome
from agent.commands.renewals import KID_MARK, Renewer
from agent.commands.spool import Inbox, ResultOutbox
from agent.errors import CommandRejected, GlucoagentError, StoreError
from agent.fsutil import atomic_write
from agent.identity import renewal
from agent.identity.credentials import DeviceIdentity
from agent.identity.wipe import wipe_state
from agent.wire.command import CLOCK_SKEW_S, MAX_COMMAND_BYTES, MAX_LIFETIME_S, Command, check_expiry
from agent.wire.inbound import Inbound, Refusal, classify
from agent.wire.renewal import Delivery
from agent.wire.result import encode_result

log = logging.getLogger(__name__)

COMMANDS_DIR = "commands"
PENDING_DIR = "pending"  # envelopes of started commands (to re-run idempotent ones after a crash), renewal marks
INBOX_DIR = "inbox"  # messages stored before the broker gets its PUBACK, until the worker took them
RESULTS_DIR = "results"  # signed results awaiting the broker's PUBACK
DEPROVISION_MARK = "deprovision"
QUEUE_MAX = 64
DELIVER_BEFORE_WIPE_S = 10.0
PRUNE_EVERY_S = 86_400.0
WORKER_WAIT_S = 60.0  # the idle worker's longest wait on its queue (submit, stop and renewals wake it sooner)


class CommandExecutor:
    def __init__(
        self,
        host: Host,
        link: Link,
        store: Store,
        clock: Clock,
        identity: DeviceIdentity,
        schedule: renewal.RenewalSchedule,
        *,
        renewed: bool = False,
    ) -> None:
        self.host, self.link, self.store, self.clock, self.identity = host, link, store, clock, identity
        self.state = identity.state_dir
        self.device_id = identity.device_id
        self.journal = CommandJournal(store)
        base = self.state / COMMANDS_DIR
        self.pending_dir = base / PENDING_DIR
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.inbox = Inbox(base / INBOX_DIR)
        # Taken before any thread runs: a message arriving during recovery is handled once, by the worker.
        self._leftover = self.inbox.leftover()
        self.outbox = ResultOutbox(base / RESULTS_DIR)
        # Only the uplink thread touches the MQTT client: it flushes the outbox on every loop pass.
        link.add_tick(lambda: self.outbox.flush(link))
        self.ring = LogRing()
        logging.getLogger().addHandler(self.ring)
        # None is a nudge (stop, a renewal asked for): the worker blocks on this queue, it does not poll.
        self._queue: queue.Queue[tuple[bytes, float, Path | None, Inbound] | None] = queue.Queue(maxsize=QUEUE_MAX)
        self._stop = threading.Event()
        self.renewer = Renewer(
            host=host, link=link, identity=identity, pending_dir=self.pending_dir, schedule=schedule,
            stopping=self._stop, report=self._report, results_waiting=lambda: len(self.outbox),
        )  # fmt: skip
        self.ctx = Context(
            host=host, link=link, store=store, clock=clock, identity=identity, state_dir=self.state, ring=self.ring,
            stopping=self._stop, deprovision_mark=base / DEPROVISION_MARK, renewed_at_start=renewed,
            renew=self.renewer.renew_command, key_changed_since=self.renewer.key_changed_since,
        )  # fmt: skip
        self._wipe = False
        self._next_prune = 0.0

    @property
    def schedule(self) -> renewal.RenewalSchedule:
        return self.renewer.schedule

    def start_renewal(self, kind: str) -> None:
        """Daemon thread: have the worker renew (``renew``) or re-enrol over the claim path (``recover``)."""
        self.renewer.ask(kind)
        self._nudge()

    # --- threads -------------------------------------------------------------------------------
    def submit(self, payload: bytes) -> bool:
        """Uplink thread: store and queue a message for the worker (a certificate delivery goes straight
        to its waiter). False when it could not be stored: then it must not be acknowledged to the broker."""
        inbound = classify(payload, self.identity.command_key, self.device_id)  # the one signature check
        if self.renewer.take_delivery(inbound):
            return True
        stored = self.inbox.store(payload)
        if stored is None and len(payload) <= MAX_COMMAND_BYTES:
            return False  # not durable: leave it unacknowledged, the broker redelivers after a reconnect
        try:
            self._queue.put_nowait((payload, time.monotonic(), stored, inbound))
        except queue.Full:
            log.error("command queue full: a message of %d bytes waits in the inbox for the next start", len(payload))
        return True

    def stop(self) -> None:
        self._stop.set()
        self._nudge()

    def _nudge(self) -> None:
        """End the worker's wait on its queue now (a full queue wakes it anyway)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def run(self) -> None:
        """Worker thread: recover what a crash cut off, then serve the queue and the results outbox."""
        try:
            self.recover()
        except Exception:
            log.exception("command recovery failed; serving new commands anyway")
        while not self._stop.is_set():
            try:
                self.work_once(timeout=WORKER_WAIT_S)
            except Exception:  # the worker must outlive any bug in one command
                log.exception("command worker: unexpected error")

    def work_once(self, timeout: float = 0.0) -> None:
        """One pass of the worker: the next queued message (waiting up to ``timeout``), an asked-for renewal."""
        try:
            item = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
        except queue.Empty:
            item = None
        if item is not None and item[0]:
            payload, received, stored, inbound = item
            self.handle(payload, received, inbound)
            if stored is not None:  # journaled (or refused) now: the inbox copy has done its job
                stored.unlink(missing_ok=True)
        self.renewer.run_asked()
        self._prune()

    def after_stop(self) -> None:
        """Daemon, after every thread stopped and the buffer closed: a deprovision wipes the box now."""
        logging.getLogger().removeHandler(self.ring)
        if self._wipe:
            wipe_state(self.host.cfg)
            log.warning("deprovisioned: key, certificate and buffer wiped from %s", self.state)

    # --- one message ------------------------------------------------------------------------------
    def handle(self, payload: bytes, received: float | None = None, inbound: Inbound | None = None) -> None:
        """One message; ``inbound`` is its classification when the uplink thread made it already."""
        received = time.monotonic() if received is None else received
        cmd = classify(payload, self.identity.command_key, self.device_id) if inbound is None else inbound
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
                self.link.wake()
            else:
                log.warning("command %s (%s) arrived again while it runs: ignored", cmd.id, cmd.type)
            return
        try:
            self._check_expiry(cmd)
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
        handler = HANDLERS[cmd.type]
        try:
            outcome = handler.run(self.ctx, cmd, received)
        except CommandRejected as exc:
            outcome = Outcome("refused", exc.code, str(exc))
        except (GlucoagentError, OSError) as exc:  # handlers._run_script turns a script's timeout into one
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
        self.link.wake()
        self.journal.finish(cmd_id, result)
        for suffix in (".cose", KID_MARK):  # the envelope and a renewal's old kid: settled now
            (self.pending_dir / f"{cmd_id}{suffix}").unlink(missing_ok=True)
        level = logging.INFO if outcome.status == "ok" else logging.WARNING
        log.log(level, "command %s (%s) %s: %s (%s)", cmd_id, ctype, outcome.status, outcome.code, outcome.message)
        if HANDLERS[ctype].stops_agent and outcome.status == "ok":
            self._finish_deprovision()

    def _sign(self, cmd_id: str, outcome: Outcome) -> bytes:
        body = encode_result(cmd_id, self.device_id, outcome.status, outcome.code, outcome.message, outcome.data)
        return self.host.signer.sign_payload(body)

    def _report(self, cmd_id: str, outcome: Outcome) -> None:
        self.outbox.put(cmd_id, self._sign(cmd_id, outcome))
        self.link.wake()

    def _refuse(self, payload: bytes, exc: CommandRejected, cmd_id: str | None = None) -> None:
        digest = hashlib.sha256(payload).hexdigest()[:16]
        log.warning("command %s refused (%s): %s", cmd_id or f"<unknown, sha256 {digest}>", exc.code, exc)
        self._report(cmd_id or "", Outcome("refused", exc.code, str(exc), {"sha256": digest}))

    def _check_expiry(self, cmd: Command) -> None:
        trusted = self.clock.quality() is not ClockQuality.UNSET
        check_expiry(cmd, wall=time.time(), clock_trusted=trusted, cloud_floor=self.journal.cloud_floor())

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

    def _finish_deprovision(self) -> None:
        deadline = time.monotonic() + DELIVER_BEFORE_WIPE_S  # let the result leave before the key is gone
        self.link.wake()
        while len(self.outbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._wipe = True
        self._stop.set()
        self.host.request_stop()

    # --- start-up recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        settled: set[str] = set()
        for cmd_id, ctype in self.journal.interrupted():
            settled.add(cmd_id)
            log.warning("command %s (%s) was cut off by a stop or crash", cmd_id, ctype)
            handler = HANDLERS.get(ctype)
            envelope = self.pending_dir / f"{cmd_id}.cose"
            if handler is not None and handler.interrupted is Interruption.RERUN and envelope.exists():
                self._rerun(cmd_id, ctype, envelope.read_bytes())
            elif handler is not None and handler.check is not None:
                outcome = handler.check(self.ctx, cmd_id)
                if outcome is None:  # undecided (an update whose gate failed: the rolled-back version reports)
                    log.warning("command %s (%s) left to a later start", cmd_id, ctype)
                    continue
                self._finish(cmd_id, ctype, outcome)
            else:
                self._finish(cmd_id, ctype, INTERRUPTED)
            if self._wipe:
                return
        if self.ctx.deprovision_mark.exists():
            log.warning("a deprovision was committed before the agent stopped: finishing it")
            self._finish_deprovision()
            return
        self.renewer.forget_marks()
        for orphan in self.pending_dir.glob("*.cose"):  # written just before a crash, never started
            if self.journal.lookup(orphan.stem) is None:
                orphan.unlink(missing_ok=True)
        for stored in self._leftover:  # acknowledged to the broker before the last stop, never handled
            payload = stored.read_bytes()
            inbound = classify(payload, self.identity.command_key, self.device_id)
            if not (isinstance(inbound, Command) and inbound.id in settled):  # its result was made just above
                log.warning("handling a command received before the last stop: %s", stored.name)
                self.handle(payload, inbound=inbound)  # the journal turns one already handled into a replay
            stored.unlink(missing_ok=True)

    def _rerun(self, cmd_id: str, ctype: str, envelope: bytes) -> None:
        cmd = classify(envelope, self.identity.command_key, self.device_id)
        try:
            if isinstance(cmd, Refusal):
                raise cmd.error
            if not isinstance(cmd, Command):  # a kept envelope is always a command; a delivery is never kept
                raise CommandRejected("malformed", "a certificate delivery, not a command")  # noqa: TRY301
            self._check_expiry(cmd)
        except CommandRejected as exc:
            self._finish(cmd_id, ctype, Outcome("failed", "interrupted", f"not run again: {exc}"))
            return
        log.info("command %s (%s) is idempotent: running it once more", cmd_id, ctype)
        self._run(cmd, time.monotonic())
