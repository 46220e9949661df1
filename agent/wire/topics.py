"""The MQTT topic scheme, in one place (documented in docs/mqtt.md).

Device topics sit under ``gluco/v1/dev/<device_id>/``; the broker's pattern ACLs
(backend/broker.py) confine each device certificate (CN = device id) to its own
subtree, and the factory claim certificate to ``gluco/v1/prov/``.
"""

from __future__ import annotations

import dataclasses
import re

PREFIX = "gluco/v1"
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

# device -> cloud
TELEMETRY = "telemetry"
STATUS = "status"  # retained: online / offline (last will)
HEALTH = "health"
RESULTS = "results"
TIME = "time"  # a request for the cloud's signed time (agent/wire/clocksync.py); answered on ACKS
# cloud -> device
ACKS = "acks"
COMMANDS = "commands"


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceTopics:
    device_id: str

    def __post_init__(self) -> None:
        if not DEVICE_ID_RE.match(self.device_id):
            raise ValueError(f"invalid device id: {self.device_id!r}")

    def _t(self, leaf: str) -> str:
        return f"{PREFIX}/dev/{self.device_id}/{leaf}"

    @property
    def telemetry(self) -> str:
        return self._t(TELEMETRY)

    @property
    def status(self) -> str:
        return self._t(STATUS)

    @property
    def health(self) -> str:
        return self._t(HEALTH)

    @property
    def results(self) -> str:
        return self._t(RESULTS)

    @property
    def time(self) -> str:
        return self._t(TIME)

    @property
    def acks(self) -> str:
        return self._t(ACKS)

    @property
    def commands(self) -> str:
        return self._t(COMMANDS)


def provision_request(request_id: str) -> str:
    if not REQUEST_ID_RE.match(request_id):
        raise ValueError(f"invalid request id: {request_id!r}")
    return f"{PREFIX}/prov/{request_id}/request"


def provision_response(request_id: str) -> str:
    if not REQUEST_ID_RE.match(request_id):
        raise ValueError(f"invalid request id: {request_id!r}")
    return f"{PREFIX}/prov/{request_id}/response"


# Wildcard subscriptions of the backend.
ALL_TELEMETRY = f"{PREFIX}/dev/+/{TELEMETRY}"
ALL_HEALTH = f"{PREFIX}/dev/+/{HEALTH}"
ALL_RESULTS = f"{PREFIX}/dev/+/{RESULTS}"
ALL_STATUS = f"{PREFIX}/dev/+/{STATUS}"
ALL_TIME = f"{PREFIX}/dev/+/{TIME}"
ALL_PROVISION_REQUESTS = f"{PREFIX}/prov/+/request"


def device_of(topic: str) -> str | None:
    """Device id from a device topic, or None when the topic is not one."""
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == PREFIX and parts[2] == "dev":
        return parts[3]
    return None
