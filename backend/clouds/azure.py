"""The reference cloud behind Azure IoT Hub (docs/clouds.md).

IoT Hub delivers device-to-cloud messages to endpoints chosen by its message routes, and takes
cloud-to-device messages through its service API; it offers neither as MQTT. A small bridge (in production an
Event Hubs consumer plus the service SDK; in the tests testbed/clouds/azure_fake.py) relays both to our
service on the broker it already uses, on these topics:

    azure-bridge/events/<endpoint>/<device id>/<property bag>   D2C as routed: the body, the bag as sent
    azure-bridge/c2d/<device id>/<property bag>                 C2D to send: ``kind``, ``$.mid``, ``ttl`` (s)

    azure-bridge/dps/allocate/<operation id>                     DPS's custom allocation webhook request (JSON)
    azure-bridge/dps/allocation/<operation id>                   our webhook's answer (JSON; ``status`` = HTTP)

The device id in an event topic is the hub's authenticated ``iothub-connection-device-id``. Two routes, set up
by the clinic's IT: ``kind IN ('telemetry', 'health')`` to the ingest endpoint, everything else to control.

C2D messages are throttled per hub unit [QUOTA "IoT Hub quotas and throttling": cloud-to-device sends], so
acks are cumulative: one signed ack per device listing everything stored since its last, every
``ACK_INTERVAL_S`` at most. The box's window holds enough batches for that (agent/wire/azure.py).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from typing import Any, ClassVar

import cbor2

from agent.wire.azure import KIND, decode_properties, encode_properties, payload_bytes
from agent.wire.profiles import Publish
from backend.clouds.adapter import (
    ACK,
    CHUNK,
    COMMAND,
    HEALTH,
    PROVISION,
    RESULTS,
    TELEMETRY,
    TIME,
    TIME_REPLY,
    CloudAdapter,
    Delivered,
)

log = logging.getLogger(__name__)
BRIDGE = "azure-bridge"
INGEST_ENDPOINT, CONTROL_ENDPOINT = "ingest", "control"
ACK_INTERVAL_S = 2.0
DEFAULT_C2D_TTL_S = 3600  # IoT Hub's default C2D time to live is 1 hour (configurable per hub up to 48 h)
TTL = "ttl"  # bridge property: seconds the hub keeps the C2D message for an offline device


def events_topic(endpoint: str, device_id: str, bag: str) -> str:
    return f"{BRIDGE}/events/{endpoint}/{device_id}/{bag}"


def c2d_topic(device_id: str, bag: str) -> str:
    return f"{BRIDGE}/c2d/{device_id}/{bag}"


def route_of(kind: str) -> str:
    """The routes docs/clouds.md tells IT to create: uploads to the ingest endpoint, the rest to control."""
    return INGEST_ENDPOINT if kind in (TELEMETRY, HEALTH) else CONTROL_ENDPOINT


FEEDBACK = f"{BRIDGE}/feedback/"  # the service API's refusal of a C2D send (429 ThrottlingException, queue full)
DPS_ALLOCATE = f"{BRIDGE}/dps/allocate/"
DPS_ALLOCATION = f"{BRIDGE}/dps/allocation/"


class AzureAdapter(CloudAdapter):
    name: ClassVar[str] = "azure"
    ack_interval_s: ClassVar[float] = ACK_INTERVAL_S
    renews_by_enrolment: ClassVar[bool] = True  # the box registers again with DPS (agent/identity/dps.py)

    def __init__(self) -> None:
        # request id -> (operation id, registration id, hub) of a custom allocation request being answered
        self._allocations: dict[str, tuple[str, str, str]] = {}

    def control_topics(self) -> list[str]:
        return [f"{BRIDGE}/events/{CONTROL_ENDPOINT}/#", DPS_ALLOCATE + "+", FEEDBACK + "+"]

    def ingest_topics(self) -> list[str]:
        return [f"{BRIDGE}/events/{INGEST_ENDPOINT}/#"]

    def incoming(self, topic: str, payload: bytes) -> Delivered | None:
        if topic.startswith(DPS_ALLOCATE):
            return self._allocate(topic[len(DPS_ALLOCATE) :], payload)
        if topic.startswith(FEEDBACK):
            # Nothing is lost: an ack not sent leaves the records in the box's buffer, which resends them after
            # mqtt.ack_timeout_s; they are stored once and acknowledged by a later cumulative ack.
            log.warning("backend: the hub refused a C2D message to %s (%s); the box resends and is acked later",
                        topic[len(FEEDBACK) :], payload.decode(errors="replace")[:120])  # fmt: skip
            return None
        parts = topic.split("/", 4)
        if len(parts) != 5 or parts[0] != BRIDGE or parts[1] != "events":
            return None
        kind = decode_properties(parts[4]).get(KIND, "")
        if kind not in (TELEMETRY, HEALTH, RESULTS, TIME) or route_of(kind) != parts[2]:
            return None  # a message the routes should not have sent here
        return Delivered(kind, parts[3], payload)

    def to_device(self, device_id: str, kind: str, payload: bytes, ttl_s: float | None = None) -> Publish:
        wire_kind = {ACK: "ack", TIME_REPLY: "time", COMMAND: "command"}.get(kind)
        if wire_kind is None:
            raise ValueError(f"nothing of kind {kind!r} travels to a box on Azure ({CHUNK}: no update downloads)")
        ttl = DEFAULT_C2D_TTL_S if ttl_s is None else max(1, int(ttl_s))
        props = {"$.mid": secrets.token_hex(8), KIND: wire_kind, TTL: str(ttl)}
        return Publish(c2d_topic(device_id, encode_properties(props)), payload)

    def _allocate(self, operation: str, payload: bytes) -> Delivered | None:
        """DPS's custom allocation request ("Understand custom allocation policies with Azure IoT Hub Device
        Provisioning Service": ``deviceRuntimeContext`` with ``registrationId`` and the device's ``payload``,
        ``linkedHubs``): our enrolment request inside goes to the service's provisioning logic."""
        try:
            doc = json.loads(payload)
            context = doc["deviceRuntimeContext"]
            request = payload_bytes(context.get("payload"))
            request_id = str(cbor2.loads(request)["req"])
            hub = str(doc["linkedHubs"][0])
            self._allocations[request_id] = (operation, str(context["registrationId"]), hub)
        except (ValueError, KeyError, IndexError, TypeError, cbor2.CBORDecodeError):
            return None  # the service answers nothing: DPS reports the webhook's failure
        return Delivered(PROVISION, request_id, request)

    def provision_reply(self, request_id: str, payload: bytes) -> Publish:
        """The webhook's answer: 200 with the hub and our reply in ``payload`` (DPS returns it to the device in
        ``registrationState.payload``), or 400 with ``<code>: <message>`` (the registration fails with it)."""
        operation, registration_id, hub = self._allocations.pop(request_id, ("", "", ""))
        reply: dict[str, Any] = cbor2.loads(payload)
        if reply.get("ok") and reply.get("device_id") != registration_id:
            answer: dict[str, Any] = {"status": 400, "message": f"bad_registration: the registration id "
                                      f"{registration_id} is not the device id {reply.get('device_id')} of the CSR"}
        elif reply.get("ok"):
            answer = {"status": 200, "iotHubHostName": hub, "payload": {"glucoagent": base64.b64encode(payload).decode()}}
        else:
            answer = {"status": 400, "message": f"{reply.get('code', 'refused')}: {reply.get('message', '')}"}
        return Publish(DPS_ALLOCATION + operation, json.dumps(answer).encode())

    def results_topic(self, device_id: str) -> str:
        return f"{BRIDGE}/events/{CONTROL_ENDPOINT}/{device_id}/#"
