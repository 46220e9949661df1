"""The ``azure`` cloud profile: Azure IoT Hub's MQTT device surface (docs/clouds.md).

Sources (each rule below names one): [MQTT] Microsoft Learn "Communicate with an IoT hub using the MQTT
protocol" (iot-mqtt-connect-to-iot-hub); [MSG] "Create and read IoT Hub messages"
(iot-hub-devguide-messages-construct); [QUOTA] "IoT Hub quotas and throttling"; [PY] azure-iot-sdk-python
``azure/iot/device/iothub/pipeline/mqtt_topic_iothub.py`` (topic and property-bag formats) and its tests;
[C] azure-iot-sdk-c ``iothub_client/src/iothubtransport_mqtt_common.c`` (topic strings, username).

Our contract on top: upload batches, results and time requests are device-to-cloud (D2C) messages with a
property bag naming what they are (``kind``, our application property) and the CBOR content type; acks,
time replies and commands arrive as cloud-to-device (C2D) messages whose ``kind`` says which, and
commands may also come as a direct method ``command`` whose JSON payload carries the COSE bytes base64-coded
(a direct method payload is JSON [MQTT]). Everything stays signed end to end: the hub is a transport.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from typing import ClassVar
from urllib.parse import quote, unquote

from agent.wire import profiles
from agent.wire.profiles import ACK, COMMAND, OUTGOING, UNKNOWN, CloudProfile, Inbound, Publish

API_VERSION = "2021-04-12"  # [MQTT] the user name's api-version; also [C] IOTHUB_API_VERSION
MAX_KEEPALIVE_S = 1177  # [MQTT] "the maximum keep-alive ... 1177 seconds" (~19.6 min)
MAX_D2C_BYTES = 262_144  # [QUOTA]/[MSG] a D2C message is at most 256 KB, body and properties together
PROPERTY_ROOM = 512  # bytes kept for our property bag within MAX_D2C_BYTES (ours is < 150)
CONTENT_TYPE = "application/cbor"
KIND = "kind"  # our application property: telemetry | health | results | time (D2C); ack | time | command (C2D)
METHOD_COMMAND = "command"  # the direct method that carries a signed command
HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{2,252}$")


def encode_properties(props: dict[str, str]) -> str:
    """A property bag: ``name=value`` pairs joined by ``&``, each side URL-encoded [MQTT] ("RFC 2396-encoded");
    [PY] quotes with no safe characters, so ``$.ct`` becomes ``%24.ct``."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in props.items())


def decode_properties(bag: str) -> dict[str, str]:
    """The inverse of ``encode_properties``; a key without ``=`` has the empty value ([PY] does the same)."""
    out: dict[str, str] = {}
    for pair in bag.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        out[unquote(key)] = unquote(value)
    return out


def events_topic(device_id: str) -> str:
    """[MQTT] D2C: ``devices/{device-id}/messages/events/`` followed by the property bag."""
    return f"devices/{device_id}/messages/events/"


def devicebound_prefix(device_id: str) -> str:
    """[MQTT] C2D arrive on ``devices/{device-id}/messages/devicebound/{property-bag}``."""
    return f"devices/{device_id}/messages/devicebound/"


METHODS_POST = "$iothub/methods/POST/"  # [MQTT] direct method requests: $iothub/methods/POST/{name}/?$rid={rid}


def method_response(status: int, rid: str, payload: bytes) -> Publish:
    """[MQTT] the answer to a direct method: ``$iothub/methods/res/{status}/?$rid={request id}``, JSON body."""
    return Publish(f"$iothub/methods/res/{status}/?$rid={quote(rid, safe='')}", payload)


def command_method_payload(cose_bytes: bytes) -> bytes:
    """The direct method payload the cloud sends for a signed command (JSON, [MQTT])."""
    return json.dumps({"cose": base64.b64encode(cose_bytes).decode()}).encode()


@dataclasses.dataclass(frozen=True, slots=True)
class AzureProfile(CloudProfile):
    """Azure IoT Hub, X.509 authentication (the device certificate; no SAS token, no password)."""

    name: ClassVar[str] = "azure"
    status_messages: ClassVar[bool] = False  # [MQTT] a will may only go to the events topic; no retained messages
    side_connections: ClassVar[bool] = False  # [MQTT] a second connection with the same device id drops the first
    enrolment: ClassVar[str] = "dps"
    max_keepalive: ClassVar[int | None] = MAX_KEEPALIVE_S
    max_message: ClassVar[int | None] = MAX_D2C_BYTES - PROPERTY_ROOM
    # [QUOTA] D2C sends are throttled per hub unit (S1: 100/s or 12/s per unit, whichever is higher): one
    # box stays far below; 10/s keeps a fleet's backlog drain from eating a small hub's whole allowance.
    max_publish_rate: ClassVar[float | None] = 10.0
    # Acks are C2D messages, throttled [QUOTA]: the backend sends them cumulatively every few seconds, so
    # the window must hold several seconds of batches or the upload would stall between acks.
    min_inflight: ClassVar[int] = 16

    azure_hub: str  # the IoT hub's host name, e.g. clinic-hub.azure-devices.net

    def __post_init__(self) -> None:
        if not HUB_RE.match(self.azure_hub):
            raise ValueError(f"mqtt.azure_hub: expected the IoT hub's host name, got {self.azure_hub!r}")

    def protocol(self, configured: str) -> str:
        return "mqttv311"  # [MQTT] IoT Hub speaks MQTT 3.1.1 (its MQTT 5 was a preview, now deprecated)

    def username(self, device_id: str) -> str | None:
        # [MQTT] "{iotHub-hostname}/{device-id}/?api-version=2021-04-12"; [C] builds the same string
        return f"{self.azure_hub}/{device_id}/?api-version={API_VERSION}"

    def outgoing(self, device_id: str, kind: str, payload: bytes, message_id: str = "") -> Publish:
        if kind not in OUTGOING or kind == profiles.STATUS:
            raise ValueError(f"profile azure sends no {kind!r} message")
        props = {"$.ct": CONTENT_TYPE}  # [MSG] system property content-type; CBOR is binary, so no $.ce
        if message_id:
            props["$.mid"] = message_id  # [MSG] message-id, carried to the ingest with the message
        props[KIND] = kind
        return Publish(events_topic(device_id) + encode_properties(props), payload)

    def subscriptions(self, device_id: str) -> list[str]:
        # [MQTT] C2D: subscribe to devices/{device-id}/messages/devicebound/# ; methods: $iothub/methods/POST/#
        return [devicebound_prefix(device_id) + "#", METHODS_POST + "#"]

    def classify(self, device_id: str, topic: str, payload: bytes) -> Inbound:
        c2d = devicebound_prefix(device_id)
        if topic.startswith(c2d):
            props = decode_properties(topic[len(c2d) :])
            kind = props.get(KIND, COMMAND)
            if kind == ACK:
                return Inbound(ACK, payload)
            if kind == profiles.TIME:
                return Inbound(profiles.TIME_REPLY, payload)
            if kind == COMMAND:
                return Inbound(COMMAND, payload)
            return Inbound(UNKNOWN, payload, note=f"C2D message of unknown kind {kind!r}")
        if topic.startswith(METHODS_POST):
            return self._method(topic[len(METHODS_POST) :], payload)
        return Inbound(UNKNOWN, payload, note=f"message on unexpected topic {topic}")

    def _method(self, rest: str, payload: bytes) -> Inbound:
        name, _, query = rest.partition("/?")
        rid = decode_properties(query).get("$rid", "")
        if not rid:
            return Inbound(UNKNOWN, payload, note=f"direct method {name!r} without a request id")
        if name != METHOD_COMMAND:
            body = json.dumps({"error": f"no method {name!r}"}).encode()
            return Inbound(UNKNOWN, payload, reply=method_response(404, rid, body), note=f"unknown direct method {name!r}")
        try:
            doc = json.loads(payload)
            cose = base64.b64decode(doc["cose"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            body = json.dumps({"error": "expected {\"cose\": base64}"}).encode()
            return Inbound(UNKNOWN, payload, reply=method_response(400, rid, body), note="malformed command method")
        return Inbound(
            COMMAND,
            cose,
            reply=method_response(200, rid, json.dumps({"stored": True}).encode()),
            reply_refused=method_response(503, rid, json.dumps({"stored": False}).encode()),
        )



# --- Device Provisioning Service (DPS) over MQTT --------------------------------------------------------------
# [DPS] Microsoft Learn "Communicate with DPS using the MQTT protocol" (iot-mqtt-connect-to-iot-dps);
# [PYP] azure-iot-sdk-python provisioning/pipeline/mqtt_topic_provisioning.py and
# pipeline_stages_provisioning.py; [CP] azure-iot-sdk-c provisioning_client/src/prov_transport_mqtt_common.c.
DPS_API_VERSION = "2019-03-31"  # [DPS] user name api-version; [PYP] constant.PROVISIONING_API_VERSION
# The CSR-during-registration flow (device certificate issuance with Azure Device Registry) is a preview that
# neither SDK above implements; public write-ups name api-version 2025-07-01-preview. We send that version with
# the CSR fields below; docs/clouds.md lists what is assumed.
DPS_CSR_API_VERSION = "2025-07-01-preview"
DPS_RESPONSES = "$dps/registrations/res/#"  # [DPS]/[PYP] subscribe before registering
DPS_DEFAULT_RETRY_S = 2.0  # [PYP] DEFAULT_POLLING_INTERVAL when a 202 names no retry-after


def dps_username(id_scope: str, registration_id: str, api_version: str = DPS_CSR_API_VERSION) -> str:
    """[DPS] "{idScope}/registrations/{registration_id}/api-version=2019-03-31"; [CP] MQTT_USERNAME_FMT."""
    return f"{id_scope}/registrations/{registration_id}/api-version={api_version}"


def dps_register_topic(rid: str) -> str:
    """[DPS]/[PYP] ``$dps/registrations/PUT/iotdps-register/?$rid={request_id}``."""
    return f"$dps/registrations/PUT/iotdps-register/?$rid={quote(rid, safe='')}"


def dps_status_topic(rid: str, operation_id: str) -> str:
    """[DPS]/[PYP] ``$dps/registrations/GET/iotdps-get-operationstatus/?$rid={request_id}&operationId={id}``."""
    return (
        f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={quote(rid, safe='')}"
        f"&operationId={quote(operation_id, safe='')}"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class DpsResponse:
    """[DPS]/[PYP] ``$dps/registrations/res/{status}/?$rid={rid}&retry-after={s}`` with a JSON body."""

    status: int
    rid: str
    retry_after_s: float | None
    body: dict[str, object]


def dps_response_topic(status: int, rid: str, retry_after_s: int | None = None) -> str:
    query = {"$rid": rid} | ({} if retry_after_s is None else {"retry-after": str(retry_after_s)})
    return f"$dps/registrations/res/{status}/?{encode_properties(query)}"


def decode_dps_response(topic: str, payload: bytes) -> DpsResponse | None:
    """None when ``topic`` is no DPS response; ValueError for a malformed one."""
    prefix = "$dps/registrations/res/"
    if not topic.startswith(prefix):
        return None
    status, _, query = topic[len(prefix) :].partition("/?")
    props = decode_properties(query)
    retry = props.get("retry-after")
    try:
        body = json.loads(payload) if payload else {}
        code, wait = int(status), float(retry) if retry else None
    except ValueError as exc:
        raise ValueError(f"malformed DPS response on {topic}: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"malformed DPS response on {topic}: the body is no JSON object")  # noqa: TRY004 (the callers catch ValueError)
    if wait is not None and not 0 <= wait < math.inf:  # nan, negative or infinite: no wait we can keep
        raise ValueError(f"malformed DPS response on {topic}: retry-after {retry!r}")
    return DpsResponse(code, props.get("$rid", ""), wait, body)


def encode_dps_register(registration_id: str, csr_der: bytes, request: bytes) -> bytes:
    """The registration body: ``registrationId`` ([DPS]/[PYP]), the CSR (preview field ``csr``, base64 DER:
    assumed), and our enrolment request (token, patient, CSR; agent/wire/provisioning.py) in ``payload``, which
    DPS hands to the custom allocation webhook as ``deviceRuntimeContext.payload``."""
    return json.dumps(
        {
            "registrationId": registration_id,
            "csr": base64.b64encode(csr_der).decode(),
            "payload": {"glucoagent": base64.b64encode(request).decode()},
        }
    ).encode()


def payload_bytes(payload: object, key: str = "glucoagent") -> bytes:
    """Our CBOR inside a DPS ``payload`` object (base64 under ``key``); ValueError when absent or malformed."""
    text = payload.get(key) if isinstance(payload, dict) else None
    try:
        return base64.b64decode(text if isinstance(text, str) else "?", validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in the DPS payload: {exc}") from None
