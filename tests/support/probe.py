"""``MqttProbe``: a paho client for tests, driven by its own network thread, with blocking calls."""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from backend.broker_config import client_id_for
from backend.mqtt_client import tls_client
from backend.pki import ClientCreds

WAIT_S = 5.0


class MqttProbe:
    """A paho client driven by its own network thread, with blocking, time-bounded calls.

    Results are kept per mid in dicts guarded by one condition, so an acknowledgement that
    arrives before the caller starts waiting is not lost.
    """

    def __init__(
        self,
        creds: ClientCreds | None,
        host: str,
        port: int,
        client_id: str = "",
        protocol: int = mqtt.MQTTv5,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        # The broker binds client ids to certificates (docs/security.md): by default take the id ours may use.
        client_id = client_id or (client_id_for(creds.common_name) if creds else f"probe-{uuid.uuid4().hex[:12]}")
        if tls is None:
            if creds is None:
                raise ValueError("creds or tls is required")
            self.client = tls_client(creds, client_id, protocol)
        else:
            self.client = mqtt.Client(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=protocol,
                reconnect_on_failure=False,
            )
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self._cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.disconnected: ReasonCode | None = None
        self.error: BaseException | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._looping = False

    # --- callbacks (network thread) ---
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.disconnected = rc
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``predicate``; a dropped connection ends the wait at once."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate() or self.disconnected is not None, timeout):
                raise TimeoutError(f"{what}: nothing within {timeout}s")
            if not predicate():
                raise ConnectionError(f"{what}: connection lost ({self.disconnected})")

    # --- blocking API (test thread) ---
    def connect(self, timeout: float = WAIT_S, *, clean_start: bool = True, session_expiry_s: int = 0) -> bool:
        """True when the broker accepted us (CONNACK success); False when TLS or CONNACK refused us.

        ``clean_start`` and ``session_expiry_s`` apply to MQTT 5 only.
        """
        props = None
        if self.client.protocol == mqtt.MQTTv5 and session_expiry_s:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
        try:
            if self.client.protocol == mqtt.MQTTv5:
                self.client.connect(self.host, self.port, keepalive=30, clean_start=clean_start, properties=props)
            else:
                self.client.connect(self.host, self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:  # TLS 1.2: the broker's alert breaks the handshake itself
            self.error = exc
            return False
        self.client.loop_start()
        self._looping = True
        # TLS 1.3: the client's handshake completes first; a refusal then arrives as an alert or EOF.
        with self._cond:
            if not self._cond.wait_for(lambda: self.connack is not None or self.disconnected is not None, timeout):
                raise TimeoutError(f"CONNACK: nothing within {timeout}s")
        return self.connack is not None and not self.connack.is_failure and self.disconnected is None

    def subscribe(
        self, topic: str, qos: int = 1, timeout: float = WAIT_S, *, no_retained: bool = False
    ) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK. ``no_retained`` (MQTT 5): skip what is retained now."""
        if no_retained:
            rc, mid = self.client.subscribe(topic, options=SubscribeOptions(qos=qos, retainHandling=2))
        else:
            rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe not sent: {mqtt.error_string(rc)}"
        self._wait(lambda: mid in self._subacks, timeout, f"SUBACK for {topic}")
        return self._subacks.pop(mid)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, timeout: float = WAIT_S, retain: bool = False
    ) -> ReasonCode:
        """Publish and wait for the PUBACK; its reason code (MQTT 5) or plain success (3.1.1)."""
        info = self.client.publish(topic, payload, qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish not sent: {mqtt.error_string(info.rc)}"
        self._wait(lambda: info.mid in self._pubacks, timeout, f"PUBACK for {topic}")
        return self._pubacks.pop(info.mid)

    def next_message(self, timeout: float = WAIT_S) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout}s") from None

    def next_message_on(self, topic: str, timeout: float = WAIT_S) -> mqtt.MQTTMessage:
        """The next message on ``topic``; others received meanwhile are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next_message(max(0.0, deadline - time.monotonic()))
            if msg.topic == topic:
                return msg

    def messages_until(self, topic: str, payload: bytes, timeout: float = WAIT_S) -> list[mqtt.MQTTMessage]:
        """Every message received before the sentinel (``topic``, ``payload``); the sentinel is consumed."""
        deadline = time.monotonic() + timeout
        before: list[mqtt.MQTTMessage] = []
        while True:
            msg = self.next_message(max(0.0, deadline - time.monotonic()))
            if msg.topic == topic and msg.payload == payload:
                return before
            before.append(msg)

    def close(self) -> None:
        if self.connack is not None and self.disconnected is None:
            self.client.disconnect()
        if self._looping:
            self.client.loop_stop()
            self._looping = False
