"""What meters and pens produce: typed, immutable records (the agent buffers and uploads them as they are).

Glucose is held in mg/dL (the unit every supported meter stores internally);
the meter's native value and unit are kept verbatim next to it so nothing is
lost by conversion.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from decimal import Decimal

MGDL_PER_MMOLL = Decimal("18.0156")  # glucose molar mass 180.156 g/mol


class Unit(enum.StrEnum):
    MGDL = "mg/dL"
    MMOLL = "mmol/L"


class RangeFlag(enum.StrEnum):
    IN_RANGE = "in"
    HIGH = "high"  # above the meter's measuring range (value = the limit)
    LOW = "low"  # below the meter's measuring range (value = the limit)


class Meal(enum.StrEnum):
    NONE = "none"
    BEFORE = "before"
    AFTER = "after"
    FASTING = "fasting"


@dataclasses.dataclass(frozen=True, slots=True)
class MeterIdentity:
    protocol: str  # e.g. "onetouch-ultra2"
    model: str
    serial: str
    firmware: str

    def __post_init__(self) -> None:
        if not self.serial:
            raise ValueError("meter serial must not be empty")


@dataclasses.dataclass(frozen=True, slots=True)
class GlucoseReading:
    """One glucose record exactly as a meter reported it, plus what we measured.

    ``meter_time`` is naive: meters keep local time with no zone.
    ``clock_offset_s`` = meter clock - agent wall clock, measured at read time
    (None when the meter clock could not be read).
    """

    meter_serial: str
    record_key: str  # stable across reads of the same meter: de-duplication key
    meter_time: dt.datetime
    value_mgdl: int  # for HIGH/LOW: the limit
    native_value: str  # as on the wire, e.g. "6.2" or "HIGH"
    native_unit: Unit
    range_flag: RangeFlag = RangeFlag.IN_RANGE
    control_solution: bool = False  # never a patient value
    meal: Meal = Meal.NONE
    comment: str = ""
    suspect: bool = False  # meter flagged the stored record as failing its own check
    clock_offset_s: float | None = None

    def __post_init__(self) -> None:
        if self.meter_time.tzinfo is not None:
            raise ValueError("meter_time must be naive meter-local time")
        if not self.record_key:
            raise ValueError("record_key must not be empty")
        if not 0 <= self.value_mgdl <= 2000:
            raise ValueError(f"value_mgdl out of range: {self.value_mgdl}")

    def with_offset(self, clock_offset_s: float | None) -> GlucoseReading:
        return dataclasses.replace(self, clock_offset_s=clock_offset_s)


def mmoll_to_mgdl(value: Decimal) -> int:
    """Convert with the documented factor, rounded half-up to whole mg/dL."""
    return int((value * MGDL_PER_MMOLL).quantize(Decimal(1), rounding="ROUND_HALF_UP"))


@dataclasses.dataclass(frozen=True, slots=True)
class PenIdentity:
    model: str
    serial: str
    firmware: str
    manufacturer: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class InsulinDose:
    """One dose from a pen's log.

    The pen has only a relative clock (seconds since pen start). ``pen_clock_s``
    is the pen's relative time read in the same session, ``read_at`` the agent's
    wall clock at that moment; wall time = read_at - (pen_clock_s - relative_time_s).
    Both raw values are kept so the cloud can recompute when our clock was wrong.
    """

    pen_serial: str
    record_key: str  # (pen serial, relative time, units): de-duplication key
    relative_time_s: int
    pen_clock_s: int
    read_at: dt.datetime  # tz-aware UTC, agent clock at read
    units: Decimal
    flags: int
    prime: bool = False  # air shot, by the documented heuristic
    insulin: str | None = None  # from configuration (pen serial -> insulin)

    def __post_init__(self) -> None:
        if self.read_at.tzinfo is None:
            raise ValueError("read_at must be tz-aware UTC")
        if not self.units.is_finite() or not Decimal(0) < self.units < Decimal(100):
            raise ValueError(f"units out of range: {self.units}")

    @property
    def dose_time(self) -> dt.datetime:
        return self.read_at - dt.timedelta(seconds=self.pen_clock_s - self.relative_time_s)


@dataclasses.dataclass(frozen=True, slots=True)
class Decoded:
    """What a raw capture of meter bytes held (``decode_capture`` of every meter driver):
    the verified readings plus one message per rejected line, frame or packet."""

    readings: tuple[GlucoseReading, ...]
    rejected: tuple[str, ...]
    serial: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MeterRead:
    """The outcome of one meter read: what verified, and whether the dump was complete."""

    identity: MeterIdentity
    readings: tuple[GlucoseReading, ...]
    complete: bool
    error: str | None = None


# --- Bluetooth LE health devices (docs/ble.md) -------------------------------------------------------
class PressureUnit(enum.StrEnum):
    MMHG = "mmHg"
    KPA = "kPa"


MMHG_PER_KPA = Decimal("7.50062")  # 1 kPa = 1000 Pa / 133.322 Pa per mmHg


def kpa_to_mmhg(value: Decimal) -> Decimal:
    """Convert with the documented factor, rounded half-up to 0.1 mmHg (cuffs resolve 1 mmHg)."""
    return (value * MMHG_PER_KPA).quantize(Decimal("0.1"), rounding="ROUND_HALF_UP")


class BpStatus(enum.StrEnum):
    """Blood Pressure Measurement Status bits (BLS 1.0), one member per condition the cuff reported."""

    BODY_MOVEMENT = "body-movement"
    CUFF_LOOSE = "cuff-too-loose"
    IRREGULAR_PULSE = "irregular-pulse"
    PULSE_ABOVE_RANGE = "pulse-above-range"
    PULSE_BELOW_RANGE = "pulse-below-range"
    PULSE_RANGE_RESERVED = "pulse-range-reserved"  # the 2-bit field held 0b11
    IMPROPER_POSITION = "improper-position"


@dataclasses.dataclass(frozen=True, slots=True)
class BloodPressureReading:
    """One blood-pressure measurement as a BLE cuff indicated it, pressures canonical in mmHg.

    ``native_*`` keep the cuff's own numbers and unit verbatim. ``device_time`` is naive cuff-local
    time, None when the cuff sent no (or an unknown) timestamp. ``map_mmhg``/``pulse_bpm`` are None
    when absent or not a number on the wire (a cuff that computes no MAP sends NaN).
    """

    device_serial: str  # the cuff's identity: its Bluetooth identity address
    record_key: str  # de-duplication key (drivers/ble/bls.py ``record_key``)
    device_time: dt.datetime | None
    systolic_mmhg: Decimal
    diastolic_mmhg: Decimal
    map_mmhg: Decimal | None
    native_unit: PressureUnit
    native_values: tuple[str, str, str]  # systolic, diastolic, MAP as on the wire ("NaN" for a special)
    pulse_bpm: Decimal | None = None
    user_id: int | None = None  # 255 on the wire ("unknown user") -> None
    status: frozenset[BpStatus] = frozenset()
    clock_offset_s: float | None = None

    def __post_init__(self) -> None:
        if self.device_time is not None and self.device_time.tzinfo is not None:
            raise ValueError("device_time must be naive device-local time")
        if not self.record_key:
            raise ValueError("record_key must not be empty")
        for name, value in (("systolic", self.systolic_mmhg), ("diastolic", self.diastolic_mmhg)):
            if not Decimal(0) < value < Decimal(400):
                raise ValueError(f"{name} out of range: {value} mmHg")
        if self.map_mmhg is not None and not Decimal(0) < self.map_mmhg < Decimal(400):
            raise ValueError(f"mean arterial pressure out of range: {self.map_mmhg} mmHg")
        if self.pulse_bpm is not None and not Decimal(0) < self.pulse_bpm < Decimal(400):
            raise ValueError(f"pulse out of range: {self.pulse_bpm} /min")
