"""Cloud profiles: how the box's one contract (signed records, signed acks, signed commands) rides on a cloud.

The agent has one buffer, one signing path and one exactly-once rule. What differs between our own broker
(``glucoagent``), Azure IoT Hub (``azure``) and AWS IoT Core (``aws``) is the envelope: the MQTT client
id and user name, the protocol version, the keepalive the service accepts, whether a retained status and a
will exist, which topic each kind of message goes to (with a property bag where the cloud wants one), what
the box subscribes to, how an inbound message is recognised (an ack, a command, a cloud request that needs
a reply of its own), and the limits (payload, publish rate, side connections). A profile answers exactly
those questions, purely: the uplink, provisioning and the side connections ask it and do the I/O.

``glucoagent`` reproduces the topic scheme of agent/wire/topics.py exactly (docs/mqtt.md). Other profiles
subclass ``CloudProfile`` and are registered in ``PROFILES`` (docs/clouds.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from agent.wire import topics
from agent.wire.provisioning import STATUS_OFFLINE

# What the box sends (``CloudProfile.outgoing``).
TELEMETRY = topics.TELEMETRY  # an upload batch of clinical records
HEALTH = topics.HEALTH  # an upload batch of health samples
RESULTS = topics.RESULTS  # a signed command result (or renewal request)
TIME = topics.TIME  # a request for the cloud's signed time
STATUS = topics.STATUS  # online / offline (only where ``status_messages``)
OUTGOING = (TELEMETRY, HEALTH, RESULTS, TIME, STATUS)

# What arrives (``Inbound.kind``).
ACK = "ack"  # a signed end-to-end ack, or the signed time reply (the uplink tells them apart by verifying)
TIME_REPLY = "time_reply"  # the cloud's signed time only (where the cloud tells it apart from acks)
COMMAND = "command"  # a signed command or certificate delivery (agent/wire/inbound.py classifies it further)
REQUEST = "request"  # a cloud request answered by ``Inbound.reply`` alone (nothing for the agent to keep)
UNKNOWN = "unknown"  # logged and ignored


@dataclasses.dataclass(frozen=True, slots=True)
class Publish:
    """One message for the link to send."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Inbound:
    """An inbound message, classified. ``payload`` is what the agent's handler gets (the signed bytes, the
    cloud's envelope taken off). ``reply`` is published once the handler took the message (it returned True:
    stored durably); ``reply_refused`` when it could not (None: stay silent, the cloud redelivers)."""

    kind: str
    payload: bytes = b""
    reply: Publish | None = None
    reply_refused: Publish | None = None
    note: str = ""  # why it is UNKNOWN, for the log


@dataclasses.dataclass(frozen=True, slots=True)
class CloudProfile:
    """The ``glucoagent`` profile (our own broker, docs/mqtt.md); the base of the others."""

    name: ClassVar[str] = "glucoagent"
    status_messages: ClassVar[bool] = True  # retained online/offline and the will exist
    side_connections: ClassVar[bool] = True  # <id>-renew, -check, -update may log in beside the daemon
    enrolment: ClassVar[str] = "claim"  # provisioning flow (agent/identity/provisioning.py dispatches on it)
    max_keepalive: ClassVar[int | None] = None  # the service's cap on the MQTT keepalive (s)
    max_message: ClassVar[int | None] = None  # the service's cap on one upload message's payload (bytes)
    max_publish_rate: ClassVar[float | None] = None  # publishes per second the service allows one connection
    min_inflight: ClassVar[int] = 1  # batches in flight at least (a cloud whose acks are cumulative needs more)

    # --- identity and session --------------------------------------------------------------
    def protocol(self, configured: str) -> str:
        """The MQTT version to speak (``mqtt.protocol`` where the service leaves the choice)."""
        return configured

    def client_id(self, device_id: str) -> str:
        return device_id

    def username(self, device_id: str) -> str | None:
        """The CONNECT user name (None: none sent; we authenticate by certificate)."""
        return None

    def keepalive(self, configured: int) -> int:
        return configured if self.max_keepalive is None else min(configured, self.max_keepalive)

    def inflight(self, configured: int) -> int:
        return max(configured, self.min_inflight)

    def payload_limit(self, kind: str) -> int | None:
        """The largest upload payload of ``kind`` the service takes (None: only ``mqtt.max_payload``)."""
        return self.max_message

    # --- topics ----------------------------------------------------------------------------
    def outgoing(self, device_id: str, kind: str, payload: bytes, message_id: str = "") -> Publish:
        """The message for ``kind`` (one of ``OUTGOING``). ``message_id`` names an upload batch for clouds
        that carry one (it is not what de-duplicates: the backend does that by (device, stream, seq))."""
        if kind not in OUTGOING:
            raise ValueError(f"unknown outgoing kind {kind!r}")
        return Publish(topics.DeviceTopics(device_id)._t(kind), payload, retain=kind == STATUS)

    def will(self, device_id: str) -> Publish | None:
        """The last will (None: the profile has none)."""
        return self.outgoing(device_id, STATUS, STATUS_OFFLINE) if self.status_messages else None

    def subscriptions(self, device_id: str) -> list[str]:
        dev = topics.DeviceTopics(device_id)
        return [dev.acks, dev.commands]

    def classify(self, device_id: str, topic: str, payload: bytes) -> Inbound:
        dev = topics.DeviceTopics(device_id)
        if topic == dev.acks:
            return Inbound(ACK, payload)
        if topic == dev.commands:
            return Inbound(COMMAND, payload)
        return Inbound(UNKNOWN, payload, note=f"message on unexpected topic {topic}")


PROFILE_NAMES = ("glucoagent", "azure", "aws")  # mqtt.profile's allowed values (agent/config.py)


def profile_classes() -> dict[str, type[CloudProfile]]:
    """Every implemented profile by name (this imports every cloud's module)."""
    return {name: cls for name in PROFILE_NAMES if (cls := _profile_class(name)) is not None}


def _profile_class(name: str) -> type[CloudProfile] | None:
    # Each cloud's module subclasses CloudProfile (imported here, late, because they import this module);
    # only the named one is imported: a box on one profile never holds another's (docs/field.md).
    if name == "aws":
        from agent.wire.aws import AwsProfile

        return AwsProfile
    if name == "azure":
        from agent.wire.azure import AzureProfile

        return AzureProfile
    return CloudProfile if name == "glucoagent" else None


def make_profile(name: str, options: Mapping[str, str] | None = None) -> CloudProfile:
    """The profile called ``name``, built from the ``mqtt.*`` options whose names are its fields (every
    field without a default is required); ValueError names what is missing."""
    cls = _profile_class(name)
    if cls is None:
        raise ValueError(f"cloud profile {name!r} is not implemented (known: {', '.join(sorted(profile_classes()))})")
    opts = dict(options or {})
    kwargs: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        value = opts.get(f.name, "")
        if value:
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING:
            raise ValueError(f"mqtt.profile {name!r} needs mqtt.{f.name}")
    return cls(**kwargs)
