"""Telemetry records as SenML packs in deterministic CBOR (schema: docs/telemetry.md).

A record is one SenML pack (RFC 8428, CBOR labels). Its first entry carries the
base name (the device URN), the base time (box wall clock at acceptance) and the
device sequence number; the following entries carry the measurement and its
context under ``glu:*``, ``ins:*``, ``alert:*`` or ``health:*`` names. Everything
the meter said is kept verbatim (native value and unit, meter time); the
interoperable value is ``glu`` in kg/m3 (1 mg/dL = 0.01 kg/m3, exact decimal).
No patient identity appears anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

import cbor2

from agent.errors import GlucoagentError

# SenML CBOR labels (RFC 8428 Table 4)
BN, BT, N, U, V, VS, VB, T, VD = -2, -3, 0, 1, 2, 3, 4, 6, 8
SENML_CBOR_CONTENT_FORMAT = 112  # application/senml+cbor, COSE content type
URN_PREFIX = "urn:dev:glucoagent:"


class _Named(Protocol):
    @property
    def value(self) -> str: ...


# The encoder reads plain fields through these protocols, so the contract does not depend on where the
# reading, dose or timestamp types live (drivers.models, agent.clock): any object with the fields fits.
class Timestamp(Protocol):
    @property
    def wall(self) -> float: ...
    @property
    def quality(self) -> _Named: ...
    @property
    def boot_id(self) -> bytes: ...
    @property
    def monotonic(self) -> float: ...


class GlucoseReading(Protocol):
    @property
    def value_mgdl(self) -> int: ...
    @property
    def native_value(self) -> str: ...
    @property
    def native_unit(self) -> _Named: ...
    @property
    def meter_serial(self) -> str: ...
    @property
    def record_key(self) -> str: ...
    @property
    def meter_time(self) -> dt.datetime: ...
    @property
    def range_flag(self) -> _Named: ...
    @property
    def meal(self) -> _Named: ...
    @property
    def clock_offset_s(self) -> float | None: ...
    @property
    def comment(self) -> str: ...
    @property
    def suspect(self) -> bool: ...
    @property
    def control_solution(self) -> bool: ...


class InsulinDose(Protocol):
    @property
    def units(self) -> Decimal: ...
    @property
    def pen_serial(self) -> str: ...
    @property
    def record_key(self) -> str: ...
    @property
    def relative_time_s(self) -> int: ...
    @property
    def pen_clock_s(self) -> int: ...
    @property
    def read_at(self) -> dt.datetime: ...
    @property
    def flags(self) -> int: ...
    @property
    def prime(self) -> bool: ...
    @property
    def insulin(self) -> str | None: ...


class BloodPressureReading(Protocol):
    @property
    def device_serial(self) -> str: ...
    @property
    def record_key(self) -> str: ...
    @property
    def device_time(self) -> dt.datetime | None: ...
    @property
    def systolic_mmhg(self) -> Decimal: ...
    @property
    def diastolic_mmhg(self) -> Decimal: ...
    @property
    def map_mmhg(self) -> Decimal | None: ...
    @property
    def native_unit(self) -> _Named: ...
    @property
    def native_values(self) -> tuple[str, str, str]: ...
    @property
    def pulse_bpm(self) -> Decimal | None: ...
    @property
    def user_id(self) -> int | None: ...
    @property
    def status(self) -> frozenset[_Named]: ...
    @property
    def clock_offset_s(self) -> float | None: ...


class Kind(enum.StrEnum):
    READING = "reading"
    BP = "bp"
    DOSE = "dose"
    ALERT = "alert"
    HEALTH = "health"


class TelemetryError(GlucoagentError):
    """A payload is not a telemetry record of our schema."""


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    device_id: str
    seq: int
    kind: Kind
    ts: Timestamp


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """A decoded record: header fields plus entries by resolved name."""

    device_id: str
    seq: int
    kind: Kind
    wall: float
    clock: str
    boot_id: bytes
    monotonic: float
    fields: Mapping[str, Any]


def _mgdl_to_kgm3(mgdl: int) -> Decimal:
    return Decimal(mgdl).scaleb(-2)


def reading_entries(r: GlucoseReading) -> list[dict[int, Any]]:
    # A control-solution result is named apart so no consumer can chart it as the patient's.
    name = "glu:control" if r.control_solution else "glu"
    entries: list[dict[int, Any]] = [
        {N: name, U: "kg/m3", V: _mgdl_to_kgm3(r.value_mgdl)},
        {N: "glu:mgdl", U: "mg/dL", V: r.value_mgdl},
        {N: "glu:native", VS: f"{r.native_value} {r.native_unit.value}"},
        {N: "glu:meter", VS: r.meter_serial},
        {N: "glu:key", VS: r.record_key},
        {N: "glu:meter_time", VS: r.meter_time.isoformat()},
        {N: "glu:range", VS: r.range_flag.value},
        {N: "glu:meal", VS: r.meal.value},
    ]
    if r.clock_offset_s is not None:
        entries.append({N: "glu:clock_offset", U: "s", V: r.clock_offset_s})
    if r.comment:
        entries.append({N: "glu:comment", VS: r.comment})
    if r.suspect:
        entries.append({N: "glu:suspect", VB: True})
    return entries


# IEEE 11073-10101 context-free codes (partition 2 SCADA x 65536 + term; docs/telemetry.md): the entry names
# of a blood-pressure record, so a consumer that knows 11073 needs no table of ours.
MDC_PRESS_BLD_NONINV_SYS = 150021
MDC_PRESS_BLD_NONINV_DIA = 150022
MDC_PRESS_BLD_NONINV_MEAN = 150023
MDC_PULS_RATE_NON_INV = 149546
MMHG = "mm[Hg]"  # UCUM: SenML registers no millimetre of mercury, and Pa would make the cuff's exact numbers inexact


def bp_entries(r: BloodPressureReading) -> list[dict[int, Any]]:
    entries: list[dict[int, Any]] = [
        {N: f"bp:{MDC_PRESS_BLD_NONINV_SYS}", U: MMHG, V: r.systolic_mmhg},
        {N: f"bp:{MDC_PRESS_BLD_NONINV_DIA}", U: MMHG, V: r.diastolic_mmhg},
    ]
    if r.map_mmhg is not None:
        entries.append({N: f"bp:{MDC_PRESS_BLD_NONINV_MEAN}", U: MMHG, V: r.map_mmhg})
    if r.pulse_bpm is not None:
        entries.append({N: f"bp:{MDC_PULS_RATE_NON_INV}", U: "beat/min", V: r.pulse_bpm})
    entries += [
        {N: "bp:native", VS: f"{'/'.join(r.native_values)} {r.native_unit.value}"},
        {N: "bp:device", VS: r.device_serial},
        {N: "bp:key", VS: r.record_key},
    ]
    if r.device_time is not None:
        entries.append({N: "bp:device_time", VS: r.device_time.isoformat()})
    if r.user_id is not None:
        entries.append({N: "bp:user", V: r.user_id})
    if r.status:
        entries.append({N: "bp:status", VS: ",".join(sorted(s.value for s in r.status))})
    if r.clock_offset_s is not None:
        entries.append({N: "bp:clock_offset", U: "s", V: r.clock_offset_s})
    return entries


def dose_entries(d: InsulinDose) -> list[dict[int, Any]]:
    entries: list[dict[int, Any]] = [
        {N: "ins", V: d.units},
        {N: "ins:unit", VS: "IU"},
        {N: "ins:pen", VS: d.pen_serial},
        {N: "ins:key", VS: d.record_key},
        {N: "ins:relative_time", U: "s", V: d.relative_time_s},
        {N: "ins:pen_clock", U: "s", V: d.pen_clock_s},
        {N: "ins:read_at", V: d.read_at.timestamp()},
        {N: "ins:flags", V: d.flags},
        {N: "ins:prime", VB: d.prime},
    ]
    if d.insulin:
        entries.append({N: "ins:type", VS: d.insulin})
    return entries


def alert_entries(
    code: str, message: str, extra: Mapping[str, str | int | float | bool] | None = None
) -> list[dict[int, Any]]:
    entries: list[dict[int, Any]] = [{N: "alert", VS: code}, {N: "alert:message", VS: message}]
    for key, value in sorted((extra or {}).items()):
        entries.append(_entry(f"alert:{key}", value))
    return entries


def health_entries(sample: Mapping[str, str | int | float | bool]) -> list[dict[int, Any]]:
    return [_entry(f"health:{key}", value) for key, value in sorted(sample.items())]


def _entry(name: str, value: str | int | float | bool) -> dict[int, Any]:
    if isinstance(value, bool):
        return {N: name, VB: value}
    if isinstance(value, str):
        return {N: name, VS: value}
    return {N: name, V: value}


def encode(header: Header, entries: Sequence[Mapping[int, Any]]) -> bytes:
    """The pack, as deterministic CBOR: the exact bytes that get signed."""
    first: dict[int, Any] = {
        BN: f"{URN_PREFIX}{header.device_id}:",
        BT: round(header.ts.wall, 3),
        N: "seq",
        U: "count",
        V: header.seq,
    }
    meta: list[dict[int, Any]] = [
        {N: "kind", VS: header.kind.value},
        {N: "clock", VS: header.ts.quality.value},
        {N: "boot", VD: header.ts.boot_id},
        {N: "mono", U: "s", V: round(header.ts.monotonic, 3)},
    ]
    return cbor2.dumps([first, *meta, *entries], canonical=True)


_VALUE_LABELS = (V, VS, VB, VD)


def decode(payload: bytes) -> Record:
    """Resolve a pack into a Record; anything not of our schema raises TelemetryError."""
    try:
        pack = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise TelemetryError(f"malformed CBOR: {exc}") from exc
    if not isinstance(pack, Sequence) or isinstance(pack, str | bytes) or not pack:
        raise TelemetryError("a SenML pack must be a non-empty array")
    fields: dict[str, Any] = {}
    base_name = ""
    base_time: float | None = None
    for entry in pack:
        if not isinstance(entry, Mapping):
            raise TelemetryError("SenML entries must be maps")
        if BN in entry:
            base_name = entry[BN]
        if BT in entry:
            base_time = entry[BT]
        name = entry.get(N)
        if not isinstance(name, str):
            raise TelemetryError("SenML entry without a name")
        values = [entry[label] for label in _VALUE_LABELS if label in entry]
        if len(values) != 1:
            raise TelemetryError(f"entry {name!r} must carry exactly one value")
        if name in fields:
            raise TelemetryError(f"entry {name!r} appears twice")
        fields[name] = values[0]
    if not isinstance(base_name, str) or not base_name.startswith(URN_PREFIX) or not base_name.endswith(":"):
        raise TelemetryError("base name is not a glucoagent device URN")
    try:
        seq = fields.pop("seq")
        kind = Kind(fields.pop("kind"))
        clock = fields.pop("clock")
        boot = fields.pop("boot")
        mono = fields.pop("mono")
    except (KeyError, ValueError) as exc:
        raise TelemetryError(f"missing or bad header entry: {exc}") from exc
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise TelemetryError("seq must be a positive integer")
    if not _float_number(base_time) or not isinstance(boot, bytes):
        raise TelemetryError("bad base time or boot id")
    if not _float_number(mono) or not isinstance(clock, str):
        raise TelemetryError("bad monotonic time or clock quality")
    assert isinstance(base_time, int | float) and isinstance(mono, int | float)
    return Record(
        device_id=base_name[len(URN_PREFIX) : -1],
        seq=seq,
        kind=kind,
        wall=float(base_time),
        clock=str(clock),
        boot_id=boot,
        monotonic=float(mono),
        fields=fields,
    )


def _float_number(value: object) -> bool:
    """A number a float holds (a CBOR bignum such as 10**400 does not: OverflowError otherwise). Infinity and
    NaN pass: the cloud quarantines such a record with its reason (backend/ingest.py ``storable``)."""
    if not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


