"""The JSON form of a reading (``decode --json`` output, simulator ``--records`` input).

Schema (documented in docs/readings.md)::

    {"meter_serial": "HAXGR4PV", "record_key": "...", "meter_time": "2011-03-09T08:38:01",
     "value_mgdl": 242, "native_value": "242", "native_unit": "mg/dL", "range_flag": "in",
     "control_solution": false, "meal": "none", "comment": "", "suspect": false,
     "clock_offset_s": null}

``to_json`` always writes every key. ``from_json`` needs only ``meter_time`` and
``value_mgdl``; the others take the defaults below (simulators recompute keys anyway).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drivers.errors import BadRecordsFile
from drivers.models import GlucoseReading, Meal, RangeFlag, Unit

KEYS = (
    "meter_serial",
    "record_key",
    "meter_time",
    "value_mgdl",
    "native_value",
    "native_unit",
    "range_flag",
    "control_solution",
    "meal",
    "comment",
    "suspect",
    "clock_offset_s",
)


class ReadingsFormatError(BadRecordsFile):
    """A readings JSON document does not follow docs/readings.md (the message names the field)."""


def to_json(reading: GlucoseReading) -> dict[str, Any]:
    return {
        "meter_serial": reading.meter_serial,
        "record_key": reading.record_key,
        "meter_time": reading.meter_time.isoformat(),
        "value_mgdl": reading.value_mgdl,
        "native_value": reading.native_value,
        "native_unit": str(reading.native_unit),
        "range_flag": str(reading.range_flag),
        "control_solution": reading.control_solution,
        "meal": str(reading.meal),
        "comment": reading.comment,
        "suspect": reading.suspect,
        "clock_offset_s": reading.clock_offset_s,
    }


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if key not in doc:
        if default is None and key in ("meter_time", "value_mgdl"):
            raise ReadingsFormatError(f"reading.{key}: required")
        return default
    value = doc[key]
    if value is None and key not in ("meter_time", "value_mgdl"):
        return default  # an optional field written as null by to_json
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ReadingsFormatError(f"reading.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def from_json(doc: dict[str, Any]) -> GlucoseReading:
    if not isinstance(doc, dict):
        raise ReadingsFormatError(f"reading: expected an object, got {type(doc).__name__}")
    unknown = set(doc) - set(KEYS)
    if unknown:
        raise ReadingsFormatError(f"reading: unknown field(s) {sorted(unknown)}")
    try:
        when = dt.datetime.fromisoformat(_get(doc, "meter_time", str))
    except ValueError as exc:
        raise ReadingsFormatError(f"reading.meter_time: not ISO-8601: {doc['meter_time']!r}") from exc
    if when.tzinfo is not None:
        raise ReadingsFormatError("reading.meter_time: must be naive meter-local time (no zone)")
    value = _get(doc, "value_mgdl", int)
    native_value = _get(doc, "native_value", str, str(value))
    serial = _get(doc, "meter_serial", str, "")
    offset = _get(doc, "clock_offset_s", (int, float), None)
    try:
        return GlucoseReading(
            meter_serial=serial,
            record_key=_get(doc, "record_key", str, f"{serial}:{when.isoformat()}:{native_value}"),
            meter_time=when,
            value_mgdl=value,
            native_value=native_value,
            native_unit=Unit(_get(doc, "native_unit", str, "mg/dL")),
            range_flag=RangeFlag(_get(doc, "range_flag", str, "in")),
            control_solution=_get(doc, "control_solution", bool, False),
            meal=Meal(_get(doc, "meal", str, "none")),
            comment=_get(doc, "comment", str, ""),
            suspect=_get(doc, "suspect", bool, False),
            clock_offset_s=None if offset is None else float(offset),
        )
    except ValueError as exc:
        raise ReadingsFormatError(f"reading: {exc}") from exc


def dumps(readings: Sequence[GlucoseReading]) -> str:
    return json.dumps([to_json(r) for r in readings], indent=1)


def load_file(path: str | Path) -> list[GlucoseReading]:
    """A JSON array of readings (newest first, as a meter sends them)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReadingsFormatError(f"{path}: cannot read: {exc}") from exc
    except ValueError as exc:
        raise ReadingsFormatError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise ReadingsFormatError(f"{path}: expected a JSON array of readings")
    out = []
    for index, item in enumerate(doc):
        try:
            out.append(from_json(item))
        except ReadingsFormatError as exc:
            raise ReadingsFormatError(f"{path}: [{index}] {exc}") from exc
    return out
