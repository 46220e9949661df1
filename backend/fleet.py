"""The fleet at a glance (``glucoagent-backend devices``): each box's link status, running agent version and
last update outcome, from the newest health sample that carries them (docs/updates.md "What the cloud sees")."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from backend.db import BackendDb

# The newest health sample of each device that names its version (a clock-anchor sample carries it too).
_LATEST = """
    SELECT d.device_id, coalesce(d.status, ''), coalesce(d.status_at, 0), r.received_at, r.fields
    FROM devices d
    LEFT JOIN records r ON r.device_id = d.device_id AND r.stream = 'h' AND r.seq = (
        SELECT max(seq) FROM records x
        WHERE x.device_id = d.device_id AND x.stream = 'h'
          AND json_extract(x.fields, '$."health:agent_version"') IS NOT NULL)
    ORDER BY d.device_id"""


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    status: str  # the broker's last will / birth: online, offline, "" never seen
    seen_at: float | None  # when the newest health sample naming the version arrived
    version: str  # "" when no sample names it yet (an agent from before versions were reported)
    update: dict[str, Any] | None  # outcome, from, to, reason, at; None when the box never settled an update


def devices(db: BackendDb) -> list[DeviceView]:
    out = []
    for device_id, status, _status_at, received_at, fields_json in db.query(_LATEST):
        fields: dict[str, Any] = json.loads(fields_json) if fields_json else {}
        update = None
        if "health:update_outcome" in fields:
            update = {k: fields.get(f"health:update_{k}", "") for k in ("outcome", "from", "to", "reason", "at")}
        out.append(DeviceView(device_id, status, received_at, str(fields.get("health:agent_version", "")), update))
    return out


def render(views: list[DeviceView]) -> list[str]:
    """One line per device: id, status, version, last update (or "-")."""
    lines = []
    for v in views:
        if v.update is None:
            last = "-"
        else:
            u = v.update
            last = f"{u['outcome']} {u['from']} -> {u['to']} ({u['reason']}) at {u['at']}"
        lines.append(f"{v.device_id}  {v.status or 'never-seen'}  version {v.version or '?'}  last update: {last}")
    return lines
