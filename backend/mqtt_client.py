"""The cloud's own MQTT client on paho 2.x: mutual TLS pinned to the fleet CA with the broker's host
name checked (``tls_client``), and ``BackendLink``, the connection the service and the command client use.

Not ``agent.link.mqtt`` on purpose: the layering lets the cloud import only ``agent.wire`` and the error root,
so the box's link (its backoff, manual acks, packet-size guard) can change without changing the cloud."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BrokerUnreachable, LinkError, LinkTimeout, NotAuthorized, TlsError
from backend.pki import ClientCreds

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True, slots=True)
class LinkSettings:
    host: str
    port: int
    client_id: str
    tls: ClientCreds
    keepalive: int = 30
    connect_timeout_s: float = 15.0
    # > 0: a session the broker keeps this long after a drop (clean_start off), so the QoS 1 messages in
    # flight to a worker that died are redelivered when it logs in again with the same client id.
    session_expiry_s: int = 0
    # True: the PUBACK of an incoming message goes only when ``on_message`` returned (the caller acks
    # through ``ack``); a process killed before that leaves the message with the broker.
    manual_ack: bool = False


def link_settings(host: str, port: int, tls: ClientCreds) -> LinkSettings:
    """The backend identity's settings; a fresh ``backend-<random>`` client id (the broker's rule for it)."""
    return LinkSettings(host=host, port=port, client_id=f"backend-{secrets.token_hex(4)}", tls=tls)


class BackendLink:
    """One MQTT 5 connection with a clean session, driven by the caller's thread through ``loop()``.

    Every paho return code and exception becomes a ``LinkError`` subclass; an incoming message goes to
    ``on_message(topic, payload)`` on the calling thread and is acknowledged when that returns.
    """

    def __init__(self, settings: LinkSettings, on_message: Callable[[str, bytes], object] | None = None) -> None:
        self.s = settings
        self._on_message = on_message
        self.client = tls_client(settings.tls, settings.client_id)
        self.client.connect_timeout = settings.connect_timeout_s
        self.client.manual_ack_set(settings.manual_ack)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_publish = self._handle_publish
        self.client.on_subscribe = self._handle_subscribe
        self.client.on_message = self._handle_message
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._connack_rc: ReasonCode | None = None
        self._connected = False
        self._acked: dict[int, int] = {}  # mid -> PUBACK reason code
        self._subacks: dict[int, list[int]] = {}

    # --- paho callbacks (inside loop()) ---------------------------------------------------------
    def _handle_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self._connack_rc = rc
        self._connected = not rc.is_failure
        self._connack.set()

    def _handle_disconnect(self, _c: mqtt.Client, _u: object, _f: object, _rc: ReasonCode, _p: object) -> None:
        self._connected = False
        self._connack.set()

    def _handle_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._lock:
            self._acked[mid] = rc.value

    def _handle_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        with self._lock:
            self._subacks[mid] = [c.value for c in codes]

    def _handle_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            try:
                self._on_message(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("handler for %s failed", msg.topic)
        if self.s.manual_ack and msg.qos:
            self.client.ack(msg.mid, msg.qos)  # handled (or given up on): the broker may forget it

    # --- API -----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """TCP, TLS, CONNECT, and wait for the CONNACK; raises a LinkError subclass."""
        where = f"{self.s.host}:{self.s.port}"
        self._connack.clear()
        self._connack_rc = None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.s.session_expiry_s:
            props.SessionExpiryInterval = self.s.session_expiry_s
        try:
            self.client.connect(
                self.s.host,
                self.s.port,
                keepalive=self.s.keepalive,
                clean_start=not self.s.session_expiry_s,
                properties=props,
            )
        except ssl.SSLError as exc:
            raise TlsError(f"TLS with the broker at {where} failed: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise BrokerUnreachable(
                f"cannot reach the broker at {where}: {getattr(exc, 'strerror', None) or exc}"
            ) from exc
        deadline = time.monotonic() + self.s.connect_timeout_s
        while not self._connack.is_set():
            if time.monotonic() > deadline:
                self.close()
                raise LinkTimeout(f"no CONNACK from {where} within {self.s.connect_timeout_s:g}s")
            if self.client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS and not self._connack.is_set():
                self.close()
                raise TlsError(f"the broker at {where} closed the connection during login (certificate refused?)")
        rc = self._connack_rc
        if rc is None or not self._connected:
            self.close()
            if rc is not None and rc.value in (0x86, 0x87, 0x8C):  # bad credentials / not authorized
                raise NotAuthorized(f"the broker at {where} refused the login: {rc}")
            raise LinkError(f"the broker at {where} refused the connection: {rc}")

    def loop(self, timeout: float = 0.5) -> bool:
        """Network I/O for up to ``timeout``; False once the link is down."""
        if not self._connected:
            return False
        if self.client.loop(timeout=timeout) != mqtt.MQTT_ERR_SUCCESS:
            self._connected = False
        return self._connected

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; returns its mid for ``acked``. Raises LinkError when it cannot be sent."""
        if not self._connected:
            raise LinkError("not connected")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info.mid

    def acked(self, mid: int) -> bool | None:
        """True: the broker took ``mid``; False: it refused it; None: no PUBACK yet."""
        with self._lock:
            reason = self._acked.pop(mid, None)
        return None if reason is None else reason < 0x80

    def subscribe(self, topics: list[str], timeout: float = 10.0, qos: int = 1) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted codes (>= 0x80: refused)."""
        rc, mid = self.client.subscribe([(t, qos) for t in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"subscribe failed: {mqtt.error_string(rc)}")
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                codes = self._subacks.pop(mid, None)
            if codes is not None:
                return codes
            if time.monotonic() > deadline:
                raise LinkTimeout(f"no SUBACK within {timeout:g}s")
            if not self.loop(0.1):
                raise LinkError("link dropped while subscribing")

    def close(self) -> None:
        """Drop the connection without DISCONNECT."""
        with contextlib.suppress(Exception):
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        self._connected = False

    def disconnect(self, *, end_session: bool = False) -> None:
        """A clean DISCONNECT; ``end_session``: the broker drops a kept session now (MQTT 5 expiry 0)."""
        if self._connected:
            props = None
            if end_session and self.s.session_expiry_s:
                props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 0
            with contextlib.suppress(Exception):
                self.client.disconnect(properties=props)
                self.client.loop(timeout=0.2)
        self._connected = False

    def unsubscribe(self, topics: list[str]) -> None:
        """Ask the broker to stop routing ``topics`` here (no wait for the UNSUBACK)."""
        with contextlib.suppress(Exception):
            self.client.unsubscribe(topics)
