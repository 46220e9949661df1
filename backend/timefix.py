"""Times corrected by the anchors boxes report after learning the cloud's signed time (docs/field.md).

Records keep the wall time the box signed; this computes, at read time, when each really was:
for a record of a boot that reported an anchor, ``anchor.true - (anchor.mono - record.mono)``.
"""

from __future__ import annotations

from agent.errors import GlucoagentError
from agent.wire import clocksync, cose, telemetry
from backend.db import BackendDb


def corrected_times(db: BackendDb, device_id: str) -> dict[tuple[str, int], float]:
    """(stream, seq) -> corrected Unix time, for every stored record of ``device_id`` whose boot has an anchor.
    The records were verified at ingest; here their signed bytes are only parsed."""
    decoded: list[tuple[str, int, telemetry.Record]] = []
    for stream, seq, raw in db.query("SELECT stream, seq, cose FROM records WHERE device_id = ?", (device_id,)):
        try:
            decoded.append((str(stream), int(seq), telemetry.decode(cose.parse_sign1(bytes(raw))[3])))
        except (GlucoagentError, ValueError, IndexError):
            continue
    anchors: dict[bytes, tuple[float, bytes, float]] = {}
    for _stream, _seq, rec in sorted(decoded, key=lambda d: d[1]):  # the latest anchor of a boot wins
        if rec.kind is telemetry.Kind.HEALTH and (anchor := clocksync.anchor_of(dict(rec.fields))) is not None:
            anchors[anchor[1]] = anchor
    out: dict[tuple[str, int], float] = {}
    for stream, seq, rec in decoded:
        anchor = anchors.get(rec.boot_id)
        if anchor is not None and (t := clocksync.corrected_time(rec.boot_id, rec.monotonic, anchor)) is not None:
            out[(stream, seq)] = t
    return out
