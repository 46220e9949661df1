"""paho-mqtt behind a small typed API: connect, publish-and-wait, subscribe, messages.

paho speaks MQTT; this module translates its return codes and exceptions into
``LinkError`` subclasses (no rc escapes) and turns PUBACK callbacks into
per-mid events that are always cleared. The caller's thread drives the network
by calling ``loop()``; paho's own auto-reconnect is not used (the uplink owns
backoff, see agent/link/uplink.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import (
    BrokerUnreachable,
    ClockNotSet,
    DnsError,
    LinkError,
    LinkTimeout,
    NotAuthorized,
    TlsError,
)
from agent.link.proxy import ProxySettings, open_tunnel

log = logging.getLogger(__name__)
SESSION_EXPIRY_S = 7 * 86_400  # the broker keeps our subscriptions and queued commands this long
PINGRESP_WAIT = 0.3  # x keepalive: how long an unanswered PINGREQ may wait before the link counts as dead
_X509_CERT_NOT_YET_VALID = 9
_X509_CERT_HAS_EXPIRED = 10


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class LinkSettings:
    host: str
    port: int
    client_id: str
    tls: TlsFiles
    protocol: str = "mqttv5"
    keepalive: int = 30
    connect_timeout_s: float = 15.0
    clean_start: bool = False  # persistent session: the broker holds commands for an offline box
    will: Will | None = None
    max_inflight: int = 20
    # The box's clock is unset or far off: check the broker's chain, name and signature but not the
    # validity window (docs/security.md "A box without a clock"). Only to learn the time.
    relax_validity: bool = False
    transport: str = "tcp"  # tcp (MQTT over TLS) | websockets (MQTT over WebSockets over TLS)
    ws_path: str = "/mqtt"
    proxy: ProxySettings | None = None  # HTTP CONNECT proxy; None: direct
    username: str | None = None  # the CONNECT user name a cloud profile asks for (agent/wire/profiles.py)
    side_connections: bool = True  # whether the cloud lets <id>-renew, -check, -update log in beside the daemon

    def side(self, suffix: str) -> LinkSettings:
        """Settings of a side connection ``<client id>-<suffix>`` (clean session, no will). Raises
        ``OneConnectionOnly`` where the cloud allows one connection per device (docs/clouds.md)."""
        if not self.side_connections:
            raise OneConnectionOnly(
                f"this cloud allows one connection per device: no '{suffix}' connection beside the agent's own"
                " (docs/clouds.md)"
            )
        return dataclasses.replace(self, client_id=f"{self.client_id}-{suffix}", clean_start=True, will=None)

    def describe(self) -> str:
        """Where this link goes, for logs and `check` (the proxy without its password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        where = f"wss://{host}:{self.port}{self.ws_path}" if self.transport == "websockets" else f"mqtts://{host}:{self.port}"
        return where + (f" via proxy {self.proxy}" if self.proxy else "")


Message = tuple[str, bytes]


class OneConnectionOnly(LinkError):
    """A side connection asked of a cloud that allows one connection per device (a second login with the
    device's id would drop the agent's own connection: Azure IoT Hub)."""


class PacketTooLarge(LinkError):
    """A PUBLISH bigger than the broker's Maximum Packet Size: refused here, because mosquitto would
    disconnect us for it and paho (2.x ignores the CONNACK property) would send it again after the
    reconnect, for ever."""


def _varint_len(n: int) -> int:
    """Bytes of an MQTT Variable Byte Integer (the Remaining Length)."""
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def publish_packet_size(topic: str, payload_len: int, *, qos: int = 1, v5: bool = True) -> int:
    """Bytes of a PUBLISH as Maximum Packet Size counts them (MQTT 5 §3.1.2.11.4: the whole packet):
    fixed header, topic, packet identifier (QoS > 0), the properties length (v5; we send no
    properties), payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + payload_len
    return 1 + _varint_len(remaining) + remaining


def max_publish_payload(max_packet: int, topic: str, *, qos: int = 1, v5: bool = True) -> int:
    """The largest payload whose PUBLISH on ``topic`` is at most ``max_packet`` bytes (-1: none fits)."""
    best = max_packet - publish_packet_size(topic, 0, qos=qos, v5=v5)  # the Remaining Length only grows
    while best >= 0 and publish_packet_size(topic, best, qos=qos, v5=v5) > max_packet:
        best -= 1  # at most 3 times
    return max(best, -1)


def verify_ignoring_validity(leaf_der: bytes, ca_pem: bytes, host: str) -> None:
    """The broker's certificate is issued (signature checked) by a pinned fleet CA and names ``host``;
    its notBefore/notAfter are not compared with our clock. Raises ssl.SSLCertVerificationError.

    Python 3.11's ssl exposes no X509_V_FLAG_NO_CHECK_TIME, so the handshake runs unverified and this
    check runs right after it, before a byte of MQTT is sent: the TLS handshake proved the peer holds
    the key of the certificate it presented, and this proves the fleet CA issued that certificate
    for this host name. cryptography is imported here only (it costs ~7 MiB held for ever)."""
    import ipaddress

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID

    def refuse(why: str) -> ssl.SSLCertVerificationError:
        err = ssl.SSLCertVerificationError(why)
        err.verify_message = why
        err.verify_code = 0
        return err

    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise refuse(f"unreadable certificate: {exc}") from exc
    issued = False
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
            issued = True
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not issued:
        raise refuse("certificate not issued by the pinned fleet CA")
    try:
        purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        purposes = None
    if purposes is not None and ExtendedKeyUsageOID.SERVER_AUTH not in purposes:
        raise refuse("certificate is not for a server (a device's certificate?)")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise refuse("certificate names no host (no subjectAltName)") from exc
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        ok = host.lower() in names or any(
            n.startswith("*.") and "." in host and host.lower().split(".", 1)[1] == n[2:] for n in names
        )
    else:
        ok = ip in san.get_values_for_type(x509.IPAddress)
    if not ok:
        raise refuse(f"certificate does not name {host}")


def _relaxed_socket_class(ca: Path, host: str) -> type[ssl.SSLSocket]:
    ca_pem = ca.read_bytes()

    class _PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            der = self.getpeercert(binary_form=True)
            if not der:
                raise ssl.SSLCertVerificationError("the broker presented no certificate")
            verify_ignoring_validity(der, ca_pem, host)

    return _PinnedSocket


def pinned_context(ca: Path) -> ssl.SSLContext:
    """A client context trusting ``ca`` alone (the fleet CA, or ``mqtt.server_ca``): no system CAs."""
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the broker's trust anchor {ca} (mqtt.server_ca, or ca.crt): {exc}") from exc


def _tls_context(files: TlsFiles, relax_validity_for: str | None = None) -> ssl.SSLContext:
    ctx = pinned_context(files.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if relax_validity_for is not None:  # verified by _PinnedSocket after the handshake instead
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.sslsocket_class = _relaxed_socket_class(files.ca, relax_validity_for)
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the device certificate or key: {exc}") from exc
    return ctx


def classify_connect_error(exc: BaseException, host: str, port: int) -> LinkError:
    """One place that turns socket/TLS failures into errors a technician can act on."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return DnsError(f"cannot resolve {host}: {exc.strerror or exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == _X509_CERT_NOT_YET_VALID:
            return ClockNotSet(
                f"the broker's certificate is not yet valid by this box's clock ({time.strftime('%Y-%m-%d %H:%M')} UTC)"
                ": set the date and time, then retry"
            )
        if exc.verify_code == _X509_CERT_HAS_EXPIRED:
            return TlsError(f"the broker's certificate has expired, or this box's clock is far ahead: {exc}")
        return TlsError(f"TLS: the broker at {where} is not signed by the pinned fleet CA ({exc.verify_message})")
    if isinstance(exc, ssl.SSLError):
        return TlsError(f"TLS handshake with {where} failed: {exc.reason or exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return LinkTimeout(f"timed out connecting to {where}")
    if isinstance(exc, ConnectionRefusedError):
        return BrokerUnreachable(f"broker {where} refused the connection (nothing listening?)")
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNRESET):
        return BrokerUnreachable(f"broker {where} unreachable: {exc.strerror}")
    if isinstance(exc, OSError):
        return BrokerUnreachable(f"cannot reach broker {where}: {exc}")
    return LinkError(f"connecting to {where}: {exc}")


class _Client(paho.Client):
    """paho's client with our own socket opening: through the CONNECT tunnel when a proxy is set, never
    through PySocks or the ``mqtt_proxy`` environment variable (which paho would silently ignore
    without PySocks, or follow without our configuration saying so)."""

    tunnel_proxy: ProxySettings | None = None

    def _get_proxy(self) -> dict[str, Any] | None:
        return None

    def _create_socket_connection(self) -> socket.socket:
        if self.tunnel_proxy is None:
            sock = socket.create_connection((self._host, self._port), timeout=self._connect_timeout)
        else:
            sock = open_tunnel(self.tunnel_proxy, self._host, self._port, self._connect_timeout)
        # paho leaves Nagle on: a small PUBLISH would wait ~40 ms for the peer's delayed ACK
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def refused_for_validity(exc: BaseException) -> bool:
    """A strict handshake failed only on the certificate's validity window (our clock, or a really
    expired certificate): the case a relaxed handshake plus the cloud's signed time can settle."""
    cause = exc.__cause__
    return isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_code in (
        _X509_CERT_NOT_YET_VALID,
        _X509_CERT_HAS_EXPIRED,
    )


class MqttLink:
    """One MQTT connection. Not reconnecting by itself: call ``connect()`` again after a drop."""

    def __init__(
        self, settings: LinkSettings, on_message: Callable[[str, bytes], bool | None] | None = None
    ) -> None:
        self.s = settings
        self._on_message = on_message
        v5 = settings.protocol == "mqttv5"
        self._v5 = v5
        websockets = settings.transport == "websockets"
        self.client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else settings.clean_start,
            reconnect_on_failure=False,
            transport="websockets" if websockets else "tcp",
        )
        self.client.tunnel_proxy = settings.proxy
        if websockets:
            self.client.ws_set_options(path=settings.ws_path)
        self.client.max_inflight_messages_set(settings.max_inflight)
        self.client.connect_timeout = settings.connect_timeout_s  # TCP connect and TLS handshake (paho: 5 s)
        self.client.max_queued_messages_set(0)
        self.client.tls_set_context(_tls_context(settings.tls, settings.host if settings.relax_validity else None))
        if settings.relax_validity:
            self.client.tls_insecure_set(True)  # paho's own name check needs a verified peer; ours ran in the handshake
        if settings.username is not None:
            self.client.username_pw_set(settings.username, None)  # authenticated by the certificate, no password
        if settings.will:
            self.client.will_set(settings.will.topic, settings.will.payload, qos=1, retain=settings.will.retain)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_publish = self._handle_publish
        self.client.on_subscribe = self._handle_subscribe
        self.client.manual_ack_set(True)
        self.client.on_message = self._handle_message
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._connack_rc: ReasonCode | int | None = None
        self._connected = False
        self._session_present = False
        self._acks: dict[int, threading.Event] = {}
        self._ack_reason: dict[int, int] = {}
        self._subacks: dict[int, tuple[threading.Event, list[int]]] = {}
        self._max_packet: int | None = None
        self.disconnect_reason: str | None = None

    # --- paho callbacks (network thread) --------------------------------------------------------
    def _handle_connect(
        self, _c: paho.Client, _u: object, flags: paho.ConnectFlags, rc: ReasonCode, props: object
    ) -> None:
        self._connack_rc = rc
        limit = getattr(props, "MaximumPacketSize", None)  # absent = no limit but the protocol's (v3.1.1: never sent)
        self._max_packet = limit if isinstance(limit, int) and limit > 0 else None
        self._session_present = bool(flags.session_present)
        self._connected = not rc.is_failure
        self._connack.set()

    def _handle_disconnect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self._connected = False
        self.disconnect_reason = str(rc)
        self._connack.set()
        with self._lock:  # wake every waiter: their PUBACK will not come on this connection
            for event in self._acks.values():
                event.set()
            for event, _codes in self._subacks.values():
                event.set()

    def _handle_publish(self, _c: paho.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._lock:
            self._ack_reason[mid] = rc.value
            event = self._acks.get(mid)
        if event:
            event.set()

    def _handle_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        with self._lock:
            entry = self._subacks.get(mid)
        if entry:
            entry[1].extend(c.value for c in codes)
            entry[0].set()

    def _handle_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        keep: bool | None = False
        try:
            if self._on_message:
                keep = self._on_message(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("handler for %s failed; left unacknowledged for redelivery", msg.topic)
        # Manual acks: the broker forgets a QoS 1 message only once the handler took it (returned
        # anything but False), so a handler that stores the message durably first never loses it to a
        # crash in between, and one that could not store it gets it again after a reconnect.
        if msg.qos > 0 and keep is not False:
            self.client.ack(msg.mid, msg.qos)

    # --- API -----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def session_present(self) -> bool:
        return self._session_present

    @property
    def max_packet_size(self) -> int | None:
        """The Maximum Packet Size the broker declared in its CONNACK (None: it declared none)."""
        return self._max_packet

    def peer_valid_at(self, when: float) -> bool:
        """Whether the broker's certificate on this connection is within its validity window at ``when``
        (an authenticated time, not the box's clock): what a relaxed handshake left unchecked."""
        from cryptography import x509

        sock = self.client.socket()
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not der:
            return False
        cert = x509.load_der_x509_certificate(der)
        return cert.not_valid_before_utc.timestamp() <= when <= cert.not_valid_after_utc.timestamp()

    def max_payload(self, topic: str, qos: int = 1) -> int | None:
        """The largest payload the broker takes on ``topic`` (None: no declared limit)."""
        if self._max_packet is None:
            return None
        return max_publish_payload(self._max_packet, topic, qos=qos, v5=self._v5)

    def connect(self) -> None:
        """Open TCP+TLS, send CONNECT, wait for CONNACK. Raises a LinkError subclass."""
        self._connack.clear()
        self._connack_rc = None
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho ships no annotations here
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            self.client.connect(
                self.s.host,
                self.s.port,
                keepalive=self.s.keepalive,
                clean_start=self.s.clean_start if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise classify_connect_error(exc, self.s.host, self.s.port) from exc
        deadline = time.monotonic() + self.s.connect_timeout_s
        while not self._connack.is_set():
            if time.monotonic() > deadline:
                self.close()
                raise LinkTimeout(f"no CONNACK from {self.s.host}:{self.s.port} within {self.s.connect_timeout_s:g}s")
            loop_rc = self.client.loop(timeout=0.2)
            if loop_rc != paho.MQTT_ERR_SUCCESS and not self._connack.is_set():
                self.close()
                raise self._closed_during_login()
        rc = self._connack_rc
        if rc is None:  # woken by on_disconnect, not by a CONNACK
            self.close()
            raise self._closed_during_login()
        if isinstance(rc, ReasonCode) and rc.is_failure:
            self.close()
            if rc.value in (0x86, 0x87, 0x8C, 0x04, 0x05):  # bad credentials / not authorized
                raise NotAuthorized(f"broker refused the login: {rc}")
            raise LinkError(f"broker refused the connection: {rc}")
        if not self._connected:
            raise LinkError(f"connection to {self.s.host}:{self.s.port} dropped during login")

    def _closed_during_login(self) -> TlsError:
        # The broker closes the TLS session when it refuses our certificate; with TLS 1.3 our side
        # of the handshake has already completed, so the refusal shows up as a close before CONNACK.
        return TlsError(
            f"the broker at {self.s.host}:{self.s.port} closed the connection during login "
            "(device certificate refused: unknown CA, expired or revoked?)"
        )

    def loop(self, timeout: float = 0.5) -> bool:
        """Run network I/O for up to ``timeout``; False once the link is down."""
        if not self._connected:
            return False
        rc = self.client.loop(timeout=timeout)
        if rc != paho.MQTT_ERR_SUCCESS:
            self._connected = False
        elif self._ping_overdue():
            log.warning("no PINGRESP within %.1fs: link is dead", PINGRESP_WAIT * self.s.keepalive)
            self.close()
        return self._connected

    def _ping_overdue(self) -> bool:
        # paho only gives up after ~2x keepalive; we want a dead link noticed within 1.5x.
        # paho sends PINGREQ one keepalive after the last packet in or out, and the uplink's loop()
        # wakes exactly then and again when the PINGRESP is overdue (due_in), so waiting 0.3 x
        # keepalive for the PINGRESP keeps the worst case at 1.3 x keepalive plus a scheduling delay,
        # with room for a loaded CPU (9 s for a PINGRESP at the default 30 s is ample on cellular).
        # paho exposes no public "ping outstanding since" so read its private timestamp.
        ping_t = getattr(self.client, "_ping_t", 0)
        return bool(ping_t) and time.monotonic() - ping_t > PINGRESP_WAIT * self.s.keepalive

    def due_in(self) -> float:
        """Seconds until this link needs a loop() pass of its own: paho's PINGREQ falls due, or its
        PINGRESP is overdue. A caller may wait in loop() this long without a dead link going unnoticed
        (paho's private timestamps, as in _ping_overdue; paho 2.x keeps them in time.monotonic)."""
        if not self.s.keepalive:
            return float("inf")
        now = time.monotonic()
        ping_t = getattr(self.client, "_ping_t", 0)
        if ping_t:
            return max(0.0, ping_t + PINGRESP_WAIT * self.s.keepalive - now)
        last = min(getattr(self.client, "_last_msg_out", now), getattr(self.client, "_last_bytes_received", now))
        return max(0.0, last + self.s.keepalive - now)

    def wake(self) -> None:
        """Any thread: end a loop() waiting in select() now. Writes a byte to paho's own wake-up socket pair
        (what its publish() does), so an idle link can wait long and still react at once."""
        pair = getattr(self.client, "_sockpairW", None)
        if pair is not None:
            with contextlib.suppress(OSError):
                pair.send(b"0")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; returns the mid to ask ``acked`` about. Raises LinkError when not sent."""
        if not self._connected:
            raise LinkError("not connected")
        if self._max_packet is not None:
            size = publish_packet_size(topic, len(payload), qos=qos, v5=self._v5)
            if size > self._max_packet:
                raise PacketTooLarge(
                    f"a {size}-byte message to {topic} exceeds the broker's maximum packet size ({self._max_packet})"
                )
        event = threading.Event()
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._ack_reason:  # PUBACK already arrived
                event.set()
            self._acks[info.mid] = event
        return info.mid

    def acked(self, mid: int) -> bool | None:
        """Non-blocking: True acked ok, False refused, None still waiting."""
        with self._lock:
            reason = self._ack_reason.get(mid)
        if reason is None:
            return None
        with self._lock:
            self._acks.pop(mid, None)
            self._ack_reason.pop(mid, None)
        return reason < 0x80

    def forget(self, mid: int) -> None:
        with self._lock:
            self._acks.pop(mid, None)
            self._ack_reason.pop(mid, None)

    def subscribe(self, topics: list[str], timeout: float = 10.0, qos: int = 1) -> list[int]:
        """Subscribe and wait for SUBACK; returns the granted codes (>= 0x80 = refused)."""
        event = threading.Event()
        codes: list[int] = []
        rc, mid = self.client.subscribe([(t, qos) for t in topics])
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"subscribe failed: {paho.error_string(rc)}")
        with self._lock:
            self._subacks[mid] = (event, codes)
        try:
            deadline = time.monotonic() + timeout
            while not event.is_set():
                if time.monotonic() > deadline:
                    raise LinkTimeout(f"no SUBACK within {timeout:g}s")
                if not self.loop(0.1):
                    raise LinkError("link dropped while subscribing")
            if not codes:
                raise LinkError("link dropped while subscribing")
            return codes
        finally:
            with self._lock:
                self._subacks.pop(mid, None)

    def close(self) -> None:
        """Drop the connection without DISCONNECT (the will is published): for dead links."""
        with contextlib.suppress(Exception):
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        with contextlib.suppress(Exception):
            self.client.loop(timeout=0.01)
        self._connected = False

    def disconnect(self) -> None:
        """Clean DISCONNECT: the broker drops the will."""
        if self._connected:
            with contextlib.suppress(Exception):
                self.client.disconnect()
                self.client.loop(timeout=0.2)
        self._connected = False
