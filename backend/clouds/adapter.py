"""The reference cloud behind a cloud's transport: where its ingest reads what boxes send, and how its acks,
time replies, commands and chunks reach a box.

The service (backend/service.py) verifies, stores and signs the same way whichever cloud carries the
messages; a ``CloudAdapter`` only translates between that cloud's delivery (topics, property bags, routes)
and the service's message kinds. ``CloudAdapter`` itself is the ``glucoagent`` adapter: our own broker and
the topic scheme of agent/wire/topics.py, exactly as before. Other clouds subclass it and are listed in
``adapter_for``; they pair with the box's profile of the same name (agent/wire/profiles.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from agent.wire import topics
from agent.wire.profiles import Publish

# What arrives for the service (``Delivered.kind``): the device's outgoing kinds, plus provisioning requests.
TELEMETRY, HEALTH, STATUS, RESULTS, FETCH, TIME = (
    topics.TELEMETRY,
    topics.HEALTH,
    topics.STATUS,
    topics.RESULTS,
    topics.FETCH,
    topics.TIME,
)
PROVISION = "provision"
# What the service sends a box (``CloudAdapter.to_device``).
ACK, TIME_REPLY, COMMAND, CHUNK = "ack", "time_reply", "command", "chunk"


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    """A message for the service: ``key`` is the device id (the transport authenticated it), or the request
    id of a provisioning request."""

    kind: str
    key: str
    payload: bytes


class CloudAdapter:
    """The ``glucoagent`` adapter: our broker, our topics."""

    name: ClassVar[str] = "glucoagent"
    # 0: one signed ack per stored batch, at once. > 0: the cloud throttles messages to a device, so acks are
    # cumulative: one ack per device listing everything stored since its last, at most this often.
    ack_interval_s: ClassVar[float] = 0.0
    # True: a box renews its certificate by enrolling again with its old key's signature (Azure: DPS, one
    # connection per device), so a re-enrolment is taken before the certificate expires, not only after.
    renews_by_enrolment: ClassVar[bool] = False

    def control_topics(self) -> list[str]:
        return [topics.ALL_PROVISION_REQUESTS, topics.ALL_STATUS, topics.ALL_RESULTS, topics.ALL_FETCH, topics.ALL_TIME]

    def ingest_topics(self) -> list[str]:
        return [topics.ALL_TELEMETRY, topics.ALL_HEALTH]

    def incoming(self, topic: str, payload: bytes) -> Delivered | None:
        """What ``topic`` carries for the service (None: nothing it handles)."""
        parts = topic.split("/")
        if topic.startswith(f"{topics.PREFIX}/prov/") and parts[-1] == "request" and len(parts) == 5:
            return Delivered(PROVISION, parts[-2], payload)
        device_id = topics.device_of(topic)
        if device_id is None or parts[-1] not in (TELEMETRY, HEALTH, STATUS, RESULTS, FETCH, TIME):
            return None
        return Delivered(parts[-1], device_id, payload)

    def to_device(self, device_id: str, kind: str, payload: bytes, ttl_s: float | None = None) -> Publish:
        """The message that brings ``payload`` of ``kind`` to the box. ``ttl_s``: how long a cloud that expires
        undelivered messages keeps it (ours keeps the session's queue, docs/mqtt.md; the argument is unused)."""
        dev = topics.DeviceTopics(device_id)
        topic = {ACK: dev.acks, TIME_REPLY: dev.acks, COMMAND: dev.commands, CHUNK: dev.chunks}[kind]
        return Publish(topic, payload)

    def command(self, device_id: str, cmd_id: str, envelope: bytes, ttl_s: float | None = None) -> Publish:
        """How one signed command leaves for a box (``glucoagent-backend command``): a message to it here."""
        return self.to_device(device_id, COMMAND, envelope, ttl_s=ttl_s)

    def provision_reply(self, request_id: str, payload: bytes) -> Publish:
        return Publish(topics.provision_response(request_id), payload)

    def results_topic(self, device_id: str) -> str:
        """A topic filter that brings a device's command results (the command client subscribes to it alone
        and picks them out with ``incoming``)."""
        return topics.DeviceTopics(device_id).results


def adapter_for(name: str) -> CloudAdapter:
    """The adapter of the cloud profile ``name``; ValueError when there is none."""
    from backend.aws import AwsAdapter  # late: they subclass CloudAdapter
    from backend.clouds.azure import AzureAdapter

    adapters: dict[str, type[CloudAdapter]] = {"glucoagent": CloudAdapter, "azure": AzureAdapter, "aws": AwsAdapter}
    if name not in adapters:
        raise ValueError(f"the reference cloud has no adapter for profile {name!r} (known: {', '.join(adapters)})")
    return adapters[name]()
