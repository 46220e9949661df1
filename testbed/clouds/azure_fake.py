"""A fake Azure IoT Hub (and its bridge to our service) on mosquitto: the documented MQTT contract, nothing more.

Azure has no offline emulator of IoT Hub's MQTT surface, so the tests run against this. It is mosquitto with
our auth plugin (client id bound to the certificate CN, plus the hub's user-name format), an ACL holding each
device to its documented topics, and ``HubResponder``: a privileged client that plays the hub's routing and
service API (see backend/clouds/azure.py for the bridge topics) and enforces what mosquitto cannot.

Sources, cited by tag at each rule:
  [MQTT]  Microsoft Learn, "Communicate with an IoT hub using the MQTT protocol"
          (MicrosoftDocs/azure-docs articles/iot/iot-mqtt-connect-to-iot-hub.md)
  [MSG]   "Create and read IoT Hub messages" (iot-hub-devguide-messages-construct): 256 KB, body + properties
  [QUOTA] "IoT Hub quotas and throttling" (iot-hub-devguide-quotas-throttling)
  [PY]    azure-iot-sdk-python, azure-iot-device/azure/iot/device/iothub/pipeline/mqtt_topic_iothub.py
  [C]     azure-iot-sdk-c, iothub_client/src/iothubtransport_mqtt_common.c
  [DPS]   Microsoft Learn, "Communicate with DPS using the MQTT protocol" (iot-mqtt-connect-to-iot-dps)
  [PYP]   azure-iot-sdk-python, azure-iot-device/azure/iot/device/provisioning/pipeline/
          (mqtt_topic_provisioning.py, pipeline_stages_provisioning.py: 202 + retry-after, polling, status)
  [ALLOC] "Understand custom allocation policies with Azure IoT Hub Device Provisioning Service"
  [CSR]   "Device certificate issuance" (Azure Device Registry, preview): the device sends a CSR when it
          registers. Neither SDK implements it; the field names (``csr`` in, our certificate back in the
          webhook's ``payload``) are this fake's assumption, documented in docs/clouds.md. Renewal is the same
          registration again with a new CSR ("renew by re-provisioning", same page): assumed, as above.
  [REST]  DPS REST reference, "Device Registration State": ``substatus`` ``initialAssignment`` the first time,
          ``reprovisionedToInitialAssignment`` when a device registers again to the hub it was on.

Not modelled: a publish to a topic outside a device's ACL is dropped by mosquitto (and PUBACKed, MQTT 3.1.1)
where the hub would close the connection; the hub's 50-message C2D queue per device; the daily message quota.
The agent's own topics come from agent/wire/azure.py, whose unit tests check them against the SDKs.

The fake DPS shares the hub's mosquitto (real DPS is another host): a claim login as registration id X would
take over a hub connection of device X, so the tests provision a box before its agent runs. A renewal
registers again as X while the box holds its hub link down; that DPS login (clean session) also drops the
hub session's queued C2D messages here, which real DPS, another host, does not touch.

Where the real service closes the connection ([MQTT]: "AMQP returns errors for many conditions, while MQTT
terminates the connection") the fake closes it too, through the auth plugin's disconnect command, and logs
``azure-fake: closed <device>: <reason>`` (``HubResponder.closed`` keeps them for the tests).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.fsutil import atomic_write
from agent.identity.credentials import build_csr, ensure_state_dir, load_or_create_key, save_credentials
from agent.identity.provisioning import BINDING_FILE, binding_for
from agent.wire.azure import KIND, MAX_D2C_BYTES, decode_properties, dps_response_topic, encode_properties
from agent.wire.provisioning import decode_reply, encode_reply, encode_request
from backend.broker import Broker
from backend.broker_config import ACL_FILE, CONF_FILE, CONTROL_TOPIC, broker_account, install_file
from backend.clouds.azure import BRIDGE, DPS_ALLOCATE, DPS_ALLOCATION, TTL, events_topic, route_of
from backend.mqtt_client import tls_client
from backend.pki import BACKEND_CN, CLAIM_CN, FleetPki
from testbed.harness import LocalSystem, device_config, stop_process

log = logging.getLogger(__name__)
HUB = "fake-hub.azure-devices.net"
DPS_SCOPE = "0ne00FAKE01"  # [DPS] the ID scope in the user name
DPS_RETRY_AFTER_S = 1  # [PYP] the 202's retry-after the device waits before polling
MAX_SUBSCRIPTIONS = 5  # [MQTT] "A device can only subscribe to five topics at a time."
# [QUOTA] cloud-to-device sends, S1: 1.67/s per unit (100/min/unit). The fake runs one S1 unit; a test may
# lower it to provoke the throttle.
C2D_PER_S = 100 / 60
C2D_BURST = 10  # token bucket depth: how many sends may come back to back before the rate applies
MAX_C2D_TTL_S = 48 * 3600  # [MSG]/[QUOTA] a C2D message's time to live is at most 48 hours
# [MQTT] the only topic filters IoT Hub supports for a device (C2D, methods, twin responses and desired patches).
_FILTERS = (
    re.compile(r"^devices/(?P<dev>[^/]+)/messages/devicebound/#$"),
    re.compile(r"^\$iothub/methods/POST/#$"),
    re.compile(r"^\$iothub/twin/res/#$"),
    re.compile(r"^\$iothub/twin/PATCH/properties/desired/#$"),
    re.compile(r"^\$dps/registrations/res/#$"),  # [DPS] the DPS endpoint's one filter (same broker here)
)


def acl() -> str:
    """Each device to its documented topics ([MQTT]); the claim identity as on our broker; the backend (the
    responder and our service) to the hub's and the bridge's topics. '#' never matches a '$' topic, so the
    '$iothub' rules are spelt out."""
    return "\n".join(
        [
            "# generated by testbed/clouds/azure_fake.py",
            f"user {BACKEND_CN}",
            "topic readwrite gluco/v1/#",
            f"topic write {CONTROL_TOPIC}",
            "topic readwrite devices/#",
            f"topic readwrite {BRIDGE}/#",
            "topic readwrite $iothub/#",
            "",
            "topic readwrite $dps/#",
            "",
            f"user {CLAIM_CN}",
            "topic deny devices/#",
            # [DPS] register and poll; responses on $dps/registrations/res/{status}/?$rid=...
            "topic write $dps/registrations/PUT/#",
            "topic write $dps/registrations/GET/#",
            "topic read $dps/registrations/res/#",
            "",
            "# devices: CN = device id = MQTT client id ([MQTT] ClientId = deviceId)",
            "pattern write devices/%u/messages/events/#",  # [MQTT] D2C, with or without a property bag
            "pattern read devices/%u/messages/devicebound/#",  # [MQTT] C2D
            # [MQTT] direct methods; mosquitto has no per-connection topics, so the fake routes a method
            # request to every device subscribed: the tests that use methods run one device.
            "pattern read $iothub/methods/POST/#",
            "pattern write $iothub/methods/res/#",
            "",
        ]
    )


class HubBroker(Broker):
    """mosquitto configured as far as IoT Hub's MQTT rules go in its configuration."""

    def __init__(self, pki: FleetPki, run_dir: Path, *, hub: str = HUB, dps_scope: str = DPS_SCOPE, **kwargs: object) -> None:
        super().__init__(pki, run_dir, **kwargs)  # type: ignore[arg-type]
        self.hub = hub
        self.dps_scope = dps_scope

    def _write_files(self) -> None:
        super()._write_files()
        account = broker_account()
        install_file(self.run_dir / ACL_FILE, acl().encode(), 0o644, account)
        lines: list[str] = []
        for line in (self.run_dir / CONF_FILE).read_text().splitlines():
            if line.startswith("max_packet_size "):
                # Above [MSG]'s 256 KB so that the responder, not mosquitto, judges size by IoT Hub's rule
                # (body plus properties); mosquitto only stops what no hub would read.
                line = f"max_packet_size {MAX_D2C_BYTES + 8192}"
            lines.append(line)
            if line.startswith("plugin_opt_control_topic "):
                lines.append(f"plugin_opt_device_username_hub {self.hub}")  # [MQTT] the Username field
                lines.append(f"plugin_opt_dps_id_scope {self.dps_scope}")  # [DPS] ClientId and Username
            if line.startswith("listener "):
                # [MQTT] "IoT Hub doesn't support QoS 2 messages ... closes the network connection"; a QoS 2
                # subscription is granted QoS 1 in the SUBACK. mosquitto's max_qos does both for 3.1.1.
                lines.append("max_qos 1")
        lines += ["log_type subscribe", "log_type unsubscribe"]
        install_file(self.run_dir / CONF_FILE, ("\n".join(lines) + "\n").encode(), 0o644, account)


@dataclasses.dataclass(slots=True)
class _Bucket:
    rate: float
    depth: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.depth, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class HubResponder:
    """The hub's own side: routes D2C messages to the bridge, sends C2D from the bridge, closes the
    connections the service would close, and tails mosquitto's log for what only the log shows (subscriptions)."""

    def __init__(self, broker: Broker, *, c2d_per_s: float = C2D_PER_S, c2d_burst: int = C2D_BURST) -> None:
        self.broker = broker
        self.closed: list[tuple[str, str]] = []  # (device, reason), in order
        self.routed = 0
        self.c2d_sent = 0
        self.c2d_throttled = 0
        self._bucket = _Bucket(c2d_per_s, c2d_burst, c2d_burst, time.monotonic())
        self._subs: dict[str, set[str]] = {}
        self.hub = broker.hub if isinstance(broker, HubBroker) else HUB
        self._operations: dict[str, dict[str, object]] = {}  # DPS operation id -> its status body
        self._pending: dict[str, str] = {}  # operation id -> registration id, while the webhook works
        self._assigned: set[str] = set()  # registration ids assigned once (a second time is a re-provisioning)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self.on_close: Callable[[str, str], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        client = tls_client(self.broker.pki.backend, "backend-azure-fake")
        client.on_message = self._on_message
        client.connect(self.broker.host, self.broker.port, keepalive=30)
        ready = threading.Event()
        client.on_subscribe = lambda *_: ready.set()
        client.loop_start()
        # retainAsPublished: the RETAIN flag as the device sent it ([MQTT] it becomes the mqtt-retain property)
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        q1 = SubscribeOptions(qos=1)
        client.subscribe(
            [
                ("devices/+/messages/events/#", opts),
                (f"{BRIDGE}/c2d/#", q1),
                ("$dps/registrations/PUT/#", q1),
                ("$dps/registrations/GET/#", q1),
                (DPS_ALLOCATION + "+", q1),
            ]
        )
        if not ready.wait(10):
            raise RuntimeError("the hub fake's responder could not subscribe")
        self._client = client
        tail = threading.Thread(target=self._tail_log, name="azure-fake-log", daemon=True)
        tail.start()
        self._threads.append(tail)

    def stop(self) -> None:
        self._stop.set()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        for t in self._threads:
            t.join(timeout=5)

    # --- enforcement -----------------------------------------------------------------------------
    def close(self, device_id: str, reason: str) -> None:
        """Close every connection of ``device_id`` (the auth plugin's disconnect command), as IoT Hub closes it."""
        log.warning("azure-fake: closed %s: %s", device_id, reason)
        with self._lock:
            self.closed.append((device_id, reason))
        if self._client is not None:
            self._client.publish(CONTROL_TOPIC, device_id.encode(), qos=1)
        if self.on_close is not None:
            self.on_close(device_id, reason)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic.startswith("devices/"):
                self._d2c(msg.topic, bytes(msg.payload), bool(msg.retain))
            elif msg.topic.startswith(f"{BRIDGE}/c2d/"):
                self._c2d(msg.topic, bytes(msg.payload))
            elif msg.topic.startswith("$dps/registrations/"):
                self._dps(msg.topic, bytes(msg.payload))
            elif msg.topic.startswith(DPS_ALLOCATION):
                self._allocated(msg.topic[len(DPS_ALLOCATION) :], bytes(msg.payload))
        except Exception:
            log.exception("azure-fake: message on %s crashed the responder", msg.topic)

    def _d2c(self, topic: str, payload: bytes, retained: bool) -> None:
        # [MQTT] devices/{device-id}/messages/events/ or .../events/{property-bag}
        parts = topic.split("/", 4)
        if len(parts) != 5 or parts[2:4] != ["messages", "events"]:
            self.close(parts[1] if len(parts) > 1 else "?", f"publish to an unsupported topic {topic}")
            return
        device_id, bag = parts[1], parts[4]
        props = decode_properties(bag)
        # [MSG] "The maximum size ... 256 KB ... the sum of the body size, the values of the message system
        # properties and the names and values of the application properties." Over MQTT the hub answers
        # an oversize message by closing the connection ([MQTT], errors terminate the connection).
        size = len(payload) + sum(len(k.encode()) + len(v.encode()) for k, v in props.items())
        if size > MAX_D2C_BYTES:
            self.close(device_id, f"device-to-cloud message of {size} bytes exceeds 256 KB (MessageTooLarge)")
            return
        if retained:
            # [MQTT] "IoT Hub doesn't persist Retain messages ... adds the mqtt-retain application property"
            props["mqtt-retain"] = "true"
            if self._client is not None:
                self._client.publish(topic, b"", qos=1, retain=True)  # mosquitto kept it: forget it
        # The hub stamps the authenticated device id; our routes ([clouds.md]) pick the endpoint by `kind`.
        route = route_of(props.get(KIND, ""))
        assert self._client is not None
        self._client.publish(events_topic(route, device_id, encode_properties(props)), payload, qos=1)
        self.routed += 1

    def _c2d(self, topic: str, payload: bytes) -> None:
        # backend/clouds/azure.py: azure-bridge/c2d/<device id>/<bag with ttl>
        parts = topic.split("/", 3)
        device_id, props = parts[2], decode_properties(parts[3] if len(parts) > 3 else "")
        assert self._client is not None
        if not self._bucket.take(time.monotonic()):
            # [QUOTA] over the C2D send rate the service API answers 429 ThrottlingException (error 429001)
            self.c2d_throttled += 1
            log.warning("azure-fake: C2D to %s throttled (429001 ThrottlingException)", device_id)
            body = b'{"errorCode":429001,"message":"ThrottlingException"}'
            self._client.publish(f"{BRIDGE}/feedback/{device_id}", body, qos=1)
            return
        ttl = min(int(props.pop(TTL, "3600") or 3600), MAX_C2D_TTL_S)
        # Expired messages are never delivered ([MSG] "expiryTimeUtc"): mosquitto's MQTT 5 message expiry
        # drops the message from an offline device's session queue after ttl seconds.
        expiry = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        expiry.MessageExpiryInterval = ttl
        # [MQTT] delivered as devices/{device-id}/messages/devicebound/{property-bag}: application properties
        # and user-settable system properties ($.mid, $.cid, ...) only.
        dest = f"devices/{device_id}/messages/devicebound/{encode_properties(props)}"
        self._client.publish(dest, payload, qos=1, properties=expiry)
        self.c2d_sent += 1

    # --- the Device Provisioning Service ------------------------------------------------------------
    def _dps_answer(self, status: int, rid: str, body: dict[str, object], retry_after: int | None = None) -> None:
        assert self._client is not None
        self._client.publish(dps_response_topic(status, rid, retry_after), json.dumps(body).encode(), qos=1)

    def _dps(self, topic: str, payload: bytes) -> None:
        path, _, query = topic.partition("/?")
        props = decode_properties(query)
        rid = props.get("$rid", "")
        if path == "$dps/registrations/PUT/iotdps-register":
            self._register(rid, payload)
        elif path == "$dps/registrations/GET/iotdps-get-operationstatus":
            op = self._operations.get(props.get("operationId", ""))
            if op is None:  # [DPS] an unknown operation: 404 with DPS's error shape
                self._dps_answer(404, rid, {"errorCode": 404201, "message": "Operation not found."})
            elif op["status"] == "assigning":
                self._dps_answer(202, rid, {"operationId": op["operationId"], "status": "assigning"}, DPS_RETRY_AFTER_S)
            else:
                self._dps_answer(200, rid, op)
        else:  # [DPS] only the documented topics: anything else closes the connection (who sent it is unknown here)
            log.warning("azure-fake: DPS publish to an unsupported topic %s", topic)

    def _register(self, rid: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
            registration_id = str(body["registrationId"])
            base64.b64decode(body["csr"], validate=True)  # [CSR] assumed field: base64 DER
        except (ValueError, KeyError, TypeError) as exc:
            # [DPS]/[PYP] a malformed request: 400 with errorCode and message
            self._dps_answer(400, rid, {"errorCode": 400004, "message": f"Malformed registration: {exc}"})
            return
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{2,63}", registration_id):
            self._dps_answer(400, rid, {"errorCode": 400004, "message": "registrationId is not valid"})
            return
        operation = f"5.{secrets.token_hex(8)}.{secrets.token_hex(4)}"
        self._operations[operation] = {"operationId": operation, "status": "assigning"}
        # [PYP] 202 with operationId, status "assigning" and retry-after: the device polls the operation
        self._dps_answer(202, rid, {"operationId": operation, "status": "assigning"}, DPS_RETRY_AFTER_S)
        # [ALLOC] the custom allocation webhook gets the device's runtime context and the linked hubs
        request = {
            "enrollmentGroup": {"enrollmentGroupId": "glucoagent-boxes", "attestation": {"type": "x509"}},
            "deviceRuntimeContext": {"registrationId": registration_id, "payload": body.get("payload")},
            "linkedHubs": [self.hub],
        }
        assert self._client is not None
        self._client.publish(DPS_ALLOCATE + operation, json.dumps(request).encode(), qos=1)
        self._pending[operation] = registration_id

    def _allocated(self, operation: str, payload: bytes) -> None:
        registration_id = self._pending.pop(operation, None)
        if registration_id is None:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        answer = json.loads(payload)
        if answer.get("status") == 200 and answer.get("iotHubHostName") == self.hub:
            state: dict[str, object] = {
                "registrationId": registration_id,
                "assignedHub": answer["iotHubHostName"],
                "deviceId": registration_id,  # [DPS] the device id is the registration id
                "status": "assigned",
                # [REST] a second registration of the same id to the same hub (a renewal) is a re-provisioning
                "substatus": "reprovisionedToInitialAssignment" if registration_id in self._assigned else "initialAssignment",
                "createdDateTimeUtc": now,
                "lastUpdatedDateTimeUtc": now,
                "payload": answer.get("payload"),  # [ALLOC] returned to the device
            }
            self._operations[operation] = {"operationId": operation, "status": "assigned", "registrationState": state}
            self._assigned.add(registration_id)
        else:  # [ALLOC] a failing webhook fails the registration; its message is kept
            state = {"registrationId": registration_id, "status": "failed", "errorCode": 400207,
                     "errorMessage": str(answer.get("message", "custom allocation failed")),
                     "lastUpdatedDateTimeUtc": now}  # fmt: skip
            self._operations[operation] = {"operationId": operation, "status": "failed", "registrationState": state}

    # --- subscriptions, from mosquitto's log -----------------------------------------------------
    def _tail_log(self) -> None:
        path = self.broker.log_path
        pos = 0
        connected = re.compile(r"New client connected from \S+ as (?P<id>\S+) \((?P<flags>[^)]*)\)")
        subscribed = re.compile(r"^\S+: (?P<id>\S+) (?P<qos>\d) (?P<topic>\S+)$")
        unsubscribed = re.compile(r"^\S+: (?P<id>\S+) (?P<topic>\S+)$")
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError), path.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
                end = chunk.rfind(b"\n") + 1
                pos += end
                for raw in chunk[:end].decode(errors="replace").splitlines():
                    self._log_line(raw, connected, subscribed, unsubscribed)

    def _log_line(self, line: str, connected: re.Pattern[str], subscribed: re.Pattern[str], unsubscribed: re.Pattern[str]) -> None:
        if m := connected.search(line):
            if "c1" in m["flags"].split(", "):
                self._subs.pop(m["id"], None)
            return
        if (m := subscribed.match(line)) and self._is_device(m["id"]):
            device_id, topic = m["id"], m["topic"]
            filt = next((m for f in _FILTERS if (m := f.match(topic)) is not None), None)
            if filt is None or filt.groupdict().get("dev", device_id) != device_id:
                # [MQTT] "it only supports the documented topic names and topic filters"
                self.close(device_id, f"subscription to an unsupported topic filter {topic}")
                return
            subs = self._subs.setdefault(device_id, set())
            subs.add(topic)
            if len(subs) > MAX_SUBSCRIPTIONS:
                self.close(device_id, f"more than {MAX_SUBSCRIPTIONS} subscriptions")
            return
        if (m := unsubscribed.match(line)) and self._is_device(m["id"]):
            self._subs.get(m["id"], set()).discard(m["topic"])

    @staticmethod
    def _is_device(client_id: str) -> bool:
        return not client_id.startswith(("backend-", "claim-")) and re.fullmatch(r"[a-z0-9][a-z0-9-]{2,63}", client_id) is not None


class AzureSystem(LocalSystem):
    """``LocalSystem`` behind the fake hub: the broker is a ``HubBroker``, the ``HubResponder`` runs beside it,
    the backend service sits behind the Azure bridge (backend/clouds/azure.py), boxes run ``mqtt.profile azure``."""

    def __init__(
        self,
        run: Path,
        *,
        hub: str = HUB,
        c2d_per_s: float = C2D_PER_S,
        c2d_burst: int = C2D_BURST,
        websockets: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(run, **kwargs)  # type: ignore[arg-type]
        self.hub = hub
        self.dps_scope = DPS_SCOPE
        # websockets: [MQTT] MQTT 3.1.1 over WebSockets on 443, path /$iothub/websocket (mosquitto: any path)
        self.broker = HubBroker(
            self.home.pki, self.home.broker_dir, hub=hub, dps_scope=self.dps_scope, websockets=websockets
        )
        self.home.crl_reloader = self.broker.reload_crl
        self.responder = HubResponder(self.broker, c2d_per_s=c2d_per_s, c2d_burst=c2d_burst)

    def start(self) -> None:
        self.broker.start()
        self.responder.start()
        self.start_backend()

    def start_backend(self) -> None:
        self.service = self.home.service("localhost", self.broker.port, self.db, cloud="azure")
        self.service.on_record = lambda dev, rec: self.on_record(dev, rec) if self.on_record else None
        self._thread = threading.Thread(target=self.service.run, name="backend", daemon=True)
        self._thread.start()
        if not self.service.ready.wait(20):
            raise RuntimeError("backend could not connect to the broker")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.stop_backend()
        self.responder.stop()
        self.broker.stop()

    def mqtt_options(self, **extra: str) -> dict[str, str]:
        """The ``mqtt`` section of a box on this hub."""
        return {"profile": "azure", "azure_hub": self.hub, "dps_id_scope": self.dps_scope, **extra}

    def provision_by_dps(self, state: Path, patient: str = "patient-1", token: str | None = None,
                         config: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """The technician's one command on a fresh box: ``glucoagent provision`` against the fake DPS."""
        token = token or self.token(patient)
        if config is None:
            config = device_config(state / "glucoagent.uci", [], mqtt=self.mqtt_options())
        return self.glucoagent(
            state, "provision", "--endpoint", self.broker.endpoint, f"--token={token}", f"--patient={patient}",
            config=config,
        )  # fmt: skip

    def enrol(self, state: Path, patient: str = "patient-1", key_type: str = "ed25519") -> str:
        """A box's credentials from our backend's provisioning logic, in process (what DPS's custom allocation
        calls; the DPS flow itself is exercised by its own test). Returns the device id."""
        assert self.service is not None
        ensure_state_dir(state)
        key = load_or_create_key(state, key_type)
        request_id = secrets.token_hex(12)
        request = encode_request(request_id, build_csr(key, "hw-" + request_id[:8]), self.token(patient), patient, {})
        reply = decode_reply(encode_reply(self.service.provision(request_id, request)))
        if not reply.get("ok"):
            raise RuntimeError(f"enrolment refused: {reply}")
        atomic_write(state / BINDING_FILE, binding_for(patient))
        save_credentials(
            state,
            device_id=str(reply["device_id"]),
            endpoint=self.broker.endpoint,
            cert_chain_pem=bytes(reply["cert"]),
            ca_pem=bytes(reply["ca"]),
            command_key_pem=bytes(reply["command_key"]),
            config=dict(reply.get("config", {})),
        )
        return str(reply["device_id"])
