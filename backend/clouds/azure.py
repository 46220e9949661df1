"""The reference cloud behind Azure IoT Hub (docs/clouds.md).

IoT Hub delivers device-to-cloud messages to endpoints chosen by its message routes, and takes
cloud-to-device messages through its service API; it offers neither as MQTT. A small bridge (in production an
Event Hubs consumer plus the service SDK; in the tests testbed/clouds/azure_fake.py) relays both to our
service on the broker it already uses, on these topics:

    azure-bridge/events/<endpoint>/<device id>/<property bag>   D2C as routed: the body, the bag as sent
    azure-bridge/c2d/<device id>/<property bag>                 C2D to send: ``kind``, ``$.mid``, ``ttl`` (s)

The device id in an event topic is the hub's authenticated ``iothub-connection-device-id``. Two routes, set up
by the clinic's IT: ``kind IN ('telemetry', 'health')`` to the ingest endpoint, everything else to control.

C2D messages are throttled per hub unit [QUOTA "IoT Hub quotas and throttling": cloud-to-device sends], so
acks are cumulative: one signed ack per device listing everything stored since its last, every
``ACK_INTERVAL_S`` at most. The box's window holds enough batches for that (agent/wire/azure.py).
"""

from __future__ import annotations

import secrets
from typing import ClassVar

from agent.wire.azure import KIND, decode_properties, encode_properties
from agent.wire.profiles import Publish
from backend.clouds.adapter import (
    ACK,
    CHUNK,
    COMMAND,
    HEALTH,
    RESULTS,
    TELEMETRY,
    TIME,
    TIME_REPLY,
    CloudAdapter,
    Delivered,
)

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


class AzureAdapter(CloudAdapter):
    name: ClassVar[str] = "azure"
    ack_interval_s: ClassVar[float] = ACK_INTERVAL_S

    def control_topics(self) -> list[str]:
        return [f"{BRIDGE}/events/{CONTROL_ENDPOINT}/#"]

    def ingest_topics(self) -> list[str]:
        return [f"{BRIDGE}/events/{INGEST_ENDPOINT}/#"]

    def incoming(self, topic: str, payload: bytes) -> Delivered | None:
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

    def results_topic(self, device_id: str) -> str:
        return f"{BRIDGE}/events/{CONTROL_ENDPOINT}/{device_id}/#"
