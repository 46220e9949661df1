"""The upload side of the daemon: keeps a link up, drains the buffer, applies acknowledgements.

One thread owns the link. It reconnects with exponential backoff and full jitter
(tenacity's ``wait_random_exponential``) from ``backoff_min_s`` to ``backoff_cap_s``;
the attempt count only resets after the link stayed up ``stable_s``, so a
flapping network does not turn into a reconnect storm. While offline it sleeps.

A row leaves the buffer only when acknowledged: by the backend's signed
end-to-end ack (default) or by the broker's PUBACK (``mqtt.ack = puback``).
Unacknowledged batches are re-sent after ``ack_timeout_s`` or a reconnect; the
backend de-duplicates by (device, stream, seq), so the effect is exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent.buffer.store import CLINICAL, HEALTH, OutboxRow, Store
from agent.clock import Anchor, Clock
from agent.config import Config, Endpoint
from agent.errors import GlucoagentError, LinkError, SignatureError, StoreError
from agent.identity.credentials import DeviceIdentity
from agent.link.mqtt import LinkSettings, MqttLink, refused_for_validity
from agent.link.proxy import parse_proxy, proxy_from_config
from agent.link.routes import device_link_settings, falls_back, link_routes, sticky_order
from agent.wire import profiles
from agent.wire.ack import decode_ack
from agent.wire.batch import batch_size, cbor_head, encode_batch
from agent.wire.clocksync import NONCE_BYTES, decode_time_reply, encode_time_request
from agent.wire.profiles import Inbound, Publish
from agent.wire.provisioning import STATUS_OFFLINE, STATUS_ONLINE
from agent.wire.topics import DeviceTopics

if TYPE_CHECKING:
    import tenacity

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 60.0  # longest wait on the socket when nothing falls due (wake() and any packet end it sooner)
_MIN_WAIT_S = 0.01  # a deadline just reached: wait a moment rather than spin until it is strictly past
DUTY_QUIET_S = 1.0  # duty mode: nothing came in for this long after the session resumed = the broker's mailbox is empty
TOO_LARGE = "record_too_large"  # condition (and alert) while a record is too large for any message


@dataclasses.dataclass(slots=True)
class _Batch:
    mid: int
    stream: str
    ids: set[int]
    seqs: set[int]
    sent_at: float


@dataclasses.dataclass(slots=True)
class Counters:
    uploaded: int = 0
    acked: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    resends: int = 0
    bad_messages: int = 0
    connected_since: float | None = None
    last_upload: float | None = None
    too_large: int = 0  # records kept in the buffer because no message may carry them (now)


class _Attempts:
    """Backoff state that survives short-lived connections."""

    def __init__(self, lo: float, cap: float) -> None:
        self.count = 0
        self._wait: tenacity.wait.wait_random_exponential | None = None
        self.lo, self.cap = lo, cap

    def next_delay(self) -> float:
        if self._wait is None:
            # tenacity loads at the first failed or lost connection, not at steady state (docs/field.md)
            import tenacity

            self._wait = tenacity.wait_random_exponential(multiplier=self.lo, max=self.cap)
        self.count += 1
        # Full jitter: uniform(0, min(cap, lo * 2^n)), but never a busy loop.
        return max(self.lo / 2, float(self._wait(types.SimpleNamespace(attempt_number=self.count))))  # type: ignore[arg-type]

    def reset(self) -> None:
        self.count = 0


class Peer(Protocol):
    """A cloud service the box talks to over its link beside the profile's messages (agent/link/aws_jobs.py):
    told of each connection, offered each message first (None: not its own), given a turn every pass."""

    def on_connect(self) -> None: ...

    def on_message(self, topic: str, payload: bytes) -> bool | None: ...

    def tick(self, link: MqttLink) -> None: ...


class Uplink:
    def __init__(
        self,
        cfg: Config,
        identity: DeviceIdentity,
        store: Store,
        on_command: Callable[[bytes], bool] | None = None,
        raise_condition: Callable[[str, str], None] | None = None,
        clock: Clock | None = None,
        on_time: Callable[[Anchor], None] | None = None,
        commands_idle: Callable[[], bool] = lambda: True,
        peer: Peer | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.store = store
        self.topics = DeviceTopics(identity.device_id)
        self.profile = cfg.mqtt.cloud()  # the cloud's envelope: identity, topics, limits (agent/wire/profiles.py)
        self.on_command = on_command
        self.peer = peer  # a cloud service spoken to beside the profile's messages (AWS Jobs), on this thread
        self.counters = Counters()
        self._inbox: queue.Queue[Inbound] = queue.Queue(maxsize=1000)
        self._inflight: dict[int, _Batch] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._attempts = _Attempts(cfg.mqtt.backoff_min_s, cfg.mqtt.backoff_cap_s)
        endpoint = Endpoint.parse(cfg.mqtt.endpoint or identity.endpoint)
        base = device_link_settings(
            self.profile,
            identity,
            endpoint,
            protocol=cfg.mqtt.protocol,
            keepalive=cfg.mqtt.keepalive,
            connect_timeout_s=cfg.mqtt.connect_timeout_s,
            server_ca=cfg.mqtt.server_ca_path(cfg.agent.state_dir),
        )
        self._endpoint, self._base = endpoint, base
        # The proxy password is read at each connect (_ways), not here: a missing or loose password file
        # is then a logged, retried failure the technician can fix without restarting the agent.
        proxy = parse_proxy(cfg.mqtt.proxy) if cfg.mqtt.proxy else None
        self.routes = link_routes(cfg.mqtt, endpoint, base, proxy)
        self._route = 0  # the way that last worked (sticky: tried first at the next connect)
        self.settings = self.routes[0]  # side connections (renewal, recovery) follow the way in use
        self.link: MqttLink | None = None
        self._ticks: list[Callable[[], None]] = []
        self.raise_condition = raise_condition
        self._too_large: set[int] = set()  # row ids, judged by the current connection's limit
        self._too_large_reported = TOO_LARGE in self._conditions()
        self.clock = clock or Clock()
        self.on_time = on_time
        self._relax = False  # next connect: handshake without the validity window (clock unset or far off)
        self._time_request: tuple[bytes, float] | None = None  # (nonce, monotonic sent) awaiting the cloud's time
        self.commands_idle = commands_idle  # no command waiting to run, no result waiting to be sent
        self._urgent = threading.Event()  # duty mode: a reading or a result to send, come up now
        self._last_in = 0.0  # monotonic time of the last message from the broker
        self.wakeups = 0  # duty mode: times the link came up
        self._next_send = 0.0  # monotonic time before which the profile's publish rate allows no upload
        self._refusals_logged: MqttLink | None = None  # the connection whose refused batches were logged already
        # One connection per device (azure): a renewal registers again with DPS as this device, so the link
        # goes down and stays down while it runs (hold), then comes back with the new certificate (release).
        self._hold = threading.Event()
        self.parked = threading.Event()  # set while held and down: the device's one connection is free

    def add_tick(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the uplink thread at every loop pass (paho's client is not thread-safe)."""
        self._ticks.append(work)

    # --- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self.wake()  # out of select() on the socket and out of a duty sleep at once

    def wake(self, urgent: bool = True) -> None:
        """New rows in the buffer: upload without waiting for the next tick. In duty mode only an ``urgent``
        wake (a reading, a command's result) brings the link up; health samples ride the next wake-up."""
        self._wake.set()
        if urgent:
            self._urgent.set()
        link = self.link
        if link is not None:
            link.wake()  # the uplink thread may be waiting in select() on the socket

    def hold(self) -> None:
        """Any thread: take the link down and keep it down until ``release`` (``parked`` says when it is)."""
        self._hold.set()
        self.wake()  # out of select() and (duty mode) out of its sleep, so the hold is seen at once

    def release(self) -> None:
        self._hold.clear()
        self.parked.clear()
        self._wake.set()

    def _pause(self, delay: float) -> None:
        """A backoff that ``stop`` and ``hold`` cut short (a renewal must not wait out a long backoff)."""
        end = time.monotonic() + delay
        while not self._stop.is_set() and not self._hold.is_set() and (left := end - time.monotonic()) > 0:
            self._stop.wait(min(left, 0.2))

    def _park(self) -> None:
        """Uplink thread: while held, stay disconnected (a clean DISCONNECT first, the session kept)."""
        if self.link is not None and self.link.connected:
            self._go_down(self.link)
        while self._hold.is_set() and not self._stop.is_set():
            self.parked.set()
            self._stop.wait(0.05)
        self.parked.clear()

    @property
    def duty(self) -> bool:
        return self.cfg.agent.link == "duty"

    def _sleep(self) -> None:
        """Duty mode, link down: until a reading is stored, a result waits, or wake_interval_s passed. The
        options are read again at least every minute, so a set_config of agent.link (to always: come up)
        or agent.wake_interval_s takes effect within one."""
        log.info("uplink: duty mode: link down; next wake-up within %.0fs", self.cfg.agent.wake_interval_s)
        down = time.monotonic()
        while not self._stop.is_set() and not self._urgent.is_set() and self.duty:
            left = down + self.cfg.agent.wake_interval_s - time.monotonic()
            if left <= 0:
                break
            self._urgent.wait(min(left, 60.0))
        self._urgent.clear()
        self.wakeups += 1

    def _done(self, since: float) -> bool:
        """Duty mode: everything is delivered and the broker's mailbox is empty, so the link may go down."""
        now = time.monotonic()
        if self._inflight or self._time_request is not None or self._relax or not self._inbox.empty():
            return False
        if now - max(since, self._last_in) < DUTY_QUIET_S or not self.commands_idle():
            return False
        try:
            return not self.store.pending(1, self._too_large)
        except StoreError:
            return False

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    def run(self) -> None:
        """Until stop(): connect, serve, back off, repeat. Never raises for link trouble."""
        asleep = False  # duty mode: the last link went down on purpose
        while not self._stop.is_set():
            if self._hold.is_set():
                self._park()
                continue
            if self.duty and asleep:
                self._sleep()
                if self._stop.is_set():
                    break
            asleep = False
            try:
                self._connect()
            except GlucoagentError as exc:
                self.counters.connect_failures += 1
                if not self._relax and refused_for_validity(exc) and self.clock.may_be_off():
                    # Only the validity window failed, by a clock no authenticated time vouches for: connect
                    # once more without it, to learn the cloud's signed time (docs/security.md).
                    log.warning("uplink: %s; connecting to learn the cloud's signed time", exc)
                    self._relax = True
                    continue
                delay = self._attempts.next_delay()
                log.warning("uplink: %s; retrying in %.1fs", exc, delay)
                self._pause(delay)
                continue
            up_since = time.monotonic()
            try:
                asleep = self._serve()
            except LinkError as exc:
                log.warning("uplink: %s", exc)
            finally:
                if self.link is not None:
                    self.link.close()
                self._inflight.clear()
                self.counters.connected_since = None
            if self._stop.is_set():
                break
            if asleep or self._hold.is_set():
                self._attempts.reset()
                continue
            if time.monotonic() - up_since >= self.cfg.mqtt.stable_s:
                self._attempts.reset()
            delay = self._attempts.next_delay()
            log.warning("uplink: link lost (%s); reconnecting in %.1fs", self._reason(), delay)
            self._pause(delay)
        self._shutdown()

    def _reason(self) -> str:
        return (self.link.disconnect_reason if self.link else None) or "closed"

    def _connect(self) -> None:
        """Each configured way in sticky order (agent/link/routes.py); when none reaches the broker,
        raises the error of the way tried first."""
        self.routes = self._ways()
        first: GlucoagentError | None = None
        for i in sticky_order(self.routes, self._route):
            try:
                self._connect_via(self.routes[i])
            except GlucoagentError as exc:
                if len(self.routes) == 1 or not falls_back(exc):
                    raise
                first = first or exc
                log.warning("uplink: %s: %s", self.routes[i].describe(), exc)
                continue
            if i != self._route:
                log.warning("uplink: now connecting by %s (the other way failed)", self.routes[i].describe())
            self._route = i
            self.settings = self.routes[i]
            return
        assert first is not None
        raise first

    def _ways(self) -> tuple[LinkSettings, ...]:
        proxy = proxy_from_config(self.cfg.mqtt.proxy, self.cfg.mqtt.proxy_password_file, self.cfg.agent.state_dir)
        return link_routes(self.cfg.mqtt, self._endpoint, self._base, proxy)

    def _connect_via(self, settings: LinkSettings) -> None:
        settings = dataclasses.replace(settings, relax_validity=self._relax)
        link = MqttLink(settings, on_message=self._on_message)
        self.link = link
        link.connect()
        try:
            codes = link.subscribe(self.profile.subscriptions(self.identity.device_id))
            if any(c >= 0x80 for c in codes):
                raise LinkError(f"broker refused our subscriptions (codes {codes})")
            mid = self.send(profiles.STATUS, STATUS_ONLINE) if self.profile.status_messages else 0
        except GlucoagentError:
            link.close()  # never leave a half-set-up connection (and its socket) behind
            raise
        if self.peer is not None:
            self.peer.on_connect()
        self.counters.reconnects += 1
        self.counters.connected_since = time.time()
        self._too_large.clear()  # the limit is this broker's: judge every record again
        self._time_request = None
        if self._relax or self.clock.needs_time():
            self._ask_time()
        log.info(
            "uplink: connected to %s as %s (session present: %s, status mid %d)",
            settings.describe(),
            self.identity.device_id,
            link.session_present,
            mid,
        )

    def _shutdown(self) -> None:
        link = self.link
        if link is not None and link.connected:
            self._go_down(link)

    def _go_down(self, link: MqttLink) -> None:
        """Say offline (retained) and DISCONNECT cleanly: the session, with commands queued for us, stays."""
        if link.connected:
            if self.profile.status_messages:
                try:
                    mid = self._publish(self.profile.outgoing(self.identity.device_id, profiles.STATUS, STATUS_OFFLINE), link)
                    deadline = time.monotonic() + 2
                    while link.acked(mid) is None and time.monotonic() < deadline and link.loop(0.05):
                        pass
                except LinkError:
                    pass
            link.disconnect()

    def send(self, kind: str, payload: bytes, message_id: str = "") -> int:
        """Publish a message of ``kind`` (agent/wire/profiles.py OUTGOING) where the profile puts it; the mid."""
        assert self.link is not None
        return self._publish(self.profile.outgoing(self.identity.device_id, kind, payload, message_id))

    def _publish(self, msg: Publish, link: MqttLink | None = None) -> int:
        link = link or self.link
        assert link is not None
        return link.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)

    def _on_message(self, topic: str, payload: bytes) -> bool:
        """False leaves the message unacknowledged, so the broker redelivers it after a reconnect."""
        self._last_in = time.monotonic()
        if self.peer is not None and (handled := self.peer.on_message(topic, payload)) is not None:
            self._wake.set()  # its answer (e.g. a job execution's update) goes out on the next pass
            return handled
        inbound = self.profile.classify(self.identity.device_id, topic, payload)
        reply_refused = inbound.reply_refused
        if inbound.kind == profiles.COMMAND and self.on_command is not None:
            taken = self.on_command(inbound.payload)  # stores it durably first: only then is it PUBACKed
        elif inbound.kind == profiles.COMMAND:
            log.warning("a command on %s ignored: this link runs no command handler", topic)
            taken, inbound = True, dataclasses.replace(inbound, reply=reply_refused)  # never claim it was stored
        elif inbound.kind in (profiles.ACK, profiles.TIME_REPLY):
            self._wake.set()
            try:
                self._inbox.put_nowait(inbound)
                taken = True
            except queue.Full:
                log.error("inbox full: a message on %s is left unacknowledged for redelivery", topic)
                taken = False
        else:
            if inbound.kind == profiles.UNKNOWN:
                log.warning("%s; ignored", inbound.note or f"message on unexpected topic {topic}")
            taken = True
        reply = inbound.reply if taken else reply_refused
        if reply is not None:  # a cloud request's answer (e.g. a direct method's response)
            try:
                self._publish(reply)
            except LinkError as exc:
                log.warning("uplink: could not answer %s: %s", topic, exc)
        return taken

    # --- the cloud's signed time (agent/wire/clocksync.py) --------------------------------------
    def _ask_time(self) -> None:
        assert self.link is not None
        nonce = os.urandom(NONCE_BYTES)
        self.send(profiles.TIME, encode_time_request(nonce))
        self._time_request = (nonce, time.monotonic())

    def _take_time(self, payload: bytes) -> bool:
        """True when ``payload`` was the answer to our time request (taken or refused)."""
        assert self._time_request is not None and self.link is not None
        nonce, sent = self._time_request
        try:
            true = decode_time_reply(payload, self.identity.command_key, self.identity.device_id, nonce)
        except SignatureError as exc:
            self.counters.bad_messages += 1
            log.error("ignoring a time reply that failed verification: %s", exc)
            return True
        if true is None:
            return False
        self._time_request = None
        anchor = self.clock.learn(true, self.cfg.agent.settime_command, rtt_s=time.monotonic() - sent)
        log.info("uplink: the cloud's signed time says the clock was off by %+.1f s", anchor.offset_s)
        if self._relax:
            if not self.link.peer_valid_at(anchor.true):
                raise LinkError("the broker's certificate is outside its validity window at the cloud's time")
            self._relax = False  # checked now against an authenticated time: the link may carry records
        if self.on_time is not None:
            self.on_time(anchor)
        return True

    # --- serving ----------------------------------------------------------------------------
    def _serve(self) -> bool:
        """Serve the link until it drops (False) or, in duty mode, until all is done and it went down (True)."""
        link = self.link
        assert link is not None
        since = time.monotonic()
        while not self._stop.is_set():
            # Wait in select() on the socket, not on an event: a PUBACK, an ack or wake() (paho's
            # wake-up socket) ends the wait at once; otherwise it lasts until something falls due.
            # After a wake-up (an ack, new rows) only poll, so the work below runs now.
            wait = 0.0 if self._wake.is_set() else self._idle_wait(link, since)
            self._wake.clear()
            if not link.loop(wait):
                return False
            self._drain_inbox()
            if self._relax:  # nothing but the time request on a link whose validity window was not checked
                self._retry_time()
                continue
            self._reap()
            self._fill_window()
            for work in self._ticks:
                work()
            if self.peer is not None:
                self.peer.tick(link)
            if self._hold.is_set():  # a renewal needs the device's one connection (``hold``)
                log.info("uplink: link down while the certificate is renewed")
                self._go_down(link)
                return False
            if self.duty and self._done(since):
                self._go_down(link)
                return True
        return False

    def _idle_wait(self, link: MqttLink, since: float) -> float:
        """How long the link may sit in select() with nothing to do: until paho's keepalive needs a pass
        (a dead link is still noticed within 1.3 x keepalive), a batch's ack or the time reply is overdue,
        or (duty mode) the quiet second after the last message ends. Long waits, few wake-ups."""
        now = time.monotonic()
        due = [_IDLE_WAIT_S, link.due_in()]
        if self._next_send > now:  # the profile's publish rate holds the next upload until then
            due.append(self._next_send - now)
        due += [b.sent_at + self.cfg.mqtt.ack_timeout_s - now for b in self._inflight.values()]
        if self._time_request is not None:
            due.append(self._time_request[1] + self.cfg.mqtt.ack_timeout_s - now)
        if self.duty:
            due.append(max(since, self._last_in) + DUTY_QUIET_S - now)
        return max(_MIN_WAIT_S, min(due))

    def _drain_inbox(self) -> None:
        # Acks that arrived together are applied in one transaction per stream: fewer fsyncs, less flash wear.
        acked: dict[str, set[int]] = {CLINICAL: set(), HEALTH: set()}
        while True:
            try:
                inbound = self._inbox.get_nowait()
            except queue.Empty:
                break
            if self._time_request is not None and self._take_time(inbound.payload):
                continue
            if inbound.kind == profiles.TIME_REPLY:
                continue  # a late or repeated answer to a time request already settled
            for stream, numbers in self._verified_ack(inbound.payload).items():
                acked[stream].update(numbers)
        for stream, pending in acked.items():
            if pending:
                self._apply_ack(stream, pending)

    def _retry_time(self) -> None:
        if self._time_request is None or time.monotonic() - self._time_request[1] > self.cfg.mqtt.ack_timeout_s:
            log.warning("uplink: no answer to the time request; asking again")
            self._ask_time()

    def _verified_ack(self, payload: bytes) -> dict[str, list[int]]:
        try:
            return decode_ack(payload, self.identity.command_key, self.identity.device_id)
        except SignatureError as exc:
            self.counters.bad_messages += 1
            log.error("ignoring an ack that failed verification: %s", exc)
            return {}

    def _apply_ack(self, stream: str, seqs: set[int]) -> None:
        try:
            done = self.store.ack(stream, seqs)
        except StoreError as exc:
            log.error("could not record an ack (will be re-acked after resend): %s", exc)
            return
        self.counters.acked += done
        for key, batch in list(self._inflight.items()):
            if batch.stream == stream:
                batch.seqs -= seqs
                if not batch.seqs:
                    del self._inflight[key]

    def _reap(self) -> None:
        """Handle PUBACKs (puback mode) and give up on batches whose ack is overdue."""
        link = self.link
        assert link is not None
        now = time.monotonic()
        acked: dict[str, set[int]] = {CLINICAL: set(), HEALTH: set()}
        for key, batch in list(self._inflight.items()):
            if self.cfg.mqtt.ack == "puback":
                ok = link.acked(batch.mid)
                if ok:
                    del self._inflight[key]
                    acked[batch.stream].update(batch.seqs)
                    continue
                if ok is False:
                    log.error("broker refused batch mid %d; will resend", batch.mid)
                    del self._inflight[key]
                    continue
            elif link.acked(batch.mid) is False:  # the PUBACK consumed; the backend's ack is what counts
                # Refused by the broker (not authorised, or over a cloud's limit such as AWS's publish rate):
                # it goes again after ack_timeout_s like any unacknowledged batch, never in a tight loop.
                level = logging.DEBUG if self._refusals_logged is link else logging.ERROR  # once per connection
                self._refusals_logged = link
                log.log(level, "uplink: the broker refused a batch of %d records (not authorised, or over a limit of "
                        "the cloud such as AWS IoT Core's publishes per second); it is sent again after %.0fs",
                        len(batch.seqs), self.cfg.mqtt.ack_timeout_s)  # fmt: skip
            if now - batch.sent_at > self.cfg.mqtt.ack_timeout_s:
                log.warning(
                    "no ack for %d records within %.0fs; resending", len(batch.seqs), self.cfg.mqtt.ack_timeout_s
                )
                self.counters.resends += 1
                link.forget(batch.mid)
                del self._inflight[key]
        for stream, seqs in acked.items():  # every PUBACK of this pass in one transaction
            if seqs:
                self._apply_ack(stream, seqs)

    def payload_limit(self, topic: str, kind: str = profiles.TELEMETRY) -> int:
        """Bytes one upload message may carry on ``topic``: the smallest of ``mqtt.max_payload``, the cloud
        profile's message limit for ``kind`` and what the broker's Maximum Packet Size (CONNACK) leaves."""
        limits = [self.cfg.mqtt.max_payload, self.profile.payload_limit(kind)]
        limits.append(self.link.max_payload(topic) if self.link is not None else None)
        return min(x for x in limits if x is not None)

    def _fill_window(self) -> None:
        link = self.link
        assert link is not None
        window = self.profile.inflight(self.cfg.mqtt.inflight)
        rate = self.profile.max_publish_rate
        while len(self._inflight) < window:
            if rate is not None and time.monotonic() < self._next_send:
                return  # the cloud's publish rate: _serve's wait ends when the next one may go
            exclude = {i for b in self._inflight.values() for i in b.ids} | self._too_large
            try:
                rows = self.store.pending(self.cfg.mqtt.batch_records, exclude)
            except StoreError as exc:
                log.error("cannot read the buffer: %s", exc)
                return
            if not rows:
                self._check_too_large()
                return
            stream = rows[0].stream
            kind = profiles.TELEMETRY if stream == CLINICAL else profiles.HEALTH
            topic = self.profile.outgoing(self.identity.device_id, kind, b"").topic
            limit = self.payload_limit(topic, kind)
            if batch_size([len(rows[0].cose)]) > limit:
                self._set_aside(rows[0], limit)
                continue
            batch: list[OutboxRow] = []
            items = 0  # bytes of the array's items so far
            for row in rows:
                item = cbor_head(len(row.cose)) + len(row.cose)
                if row.stream != stream or cbor_head(len(batch) + 1) + items + item > limit:
                    break  # a row too large even alone comes first next time and is set aside then
                batch.append(row)
                items += item
            seqs = [r.seq for r in batch]
            mid = self.send(kind, encode_batch([r.cose for r in batch]), f"{stream}-{seqs[0]}-{seqs[-1]}")
            if rate is not None:
                self._next_send = time.monotonic() + 1.0 / rate
            self._inflight[mid] = _Batch(mid, stream, {r.id for r in batch}, {r.seq for r in batch}, time.monotonic())
            self.counters.uploaded += len(batch)
            self.counters.last_upload = time.time()

    def _set_aside(self, row: OutboxRow, limit: int) -> None:
        """A record no message may carry under this broker's limit stays in the buffer (never dropped: it is
        sent once the limit allows, e.g. after the broker's max_packet_size or mqtt.max_payload is raised)
        and the others go on. Logged, counted in health and status, raised once as a condition/alert."""
        self._too_large.add(row.id)
        self.counters.too_large = len(self._too_large)
        message = (
            f"record {row.stream}/{row.seq} ({row.kind}, {len(row.cose)} bytes) is larger than a message may be "
            f"({limit} bytes: mqtt.max_payload or the broker's maximum packet size); kept in the buffer, not sent"
        )
        log.error("uplink: %s", message)
        if not self._too_large_reported and self.raise_condition is not None:
            self.raise_condition(TOO_LARGE, message)
            self._too_large_reported = True

    def _check_too_large(self) -> None:
        """Everything else is sent: if nothing was too large on this connection, the condition is over."""
        self.counters.too_large = len(self._too_large)
        if self._too_large or not self._too_large_reported:
            return
        try:
            self.store.clear_condition(TOO_LARGE)
        except StoreError as exc:
            log.error("could not clear condition %s: %s", TOO_LARGE, exc)
            return
        self._too_large_reported = False
        log.info("uplink: no record is too large for a message any more")

    def _conditions(self) -> dict[str, tuple[float, str]]:
        try:
            return self.store.conditions()
        except StoreError:
            return {}

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.counters) | {"connected": self.connected, "inflight": len(self._inflight)}

