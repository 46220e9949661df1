"""Blood Pressure Profile (BLS 1.0) codecs: pure functions, no Bluetooth stack.

Blood Pressure Measurement 0x2A35 (indicated) and Blood Pressure Feature 0x2A49; docs/ble.md maps the
fields. Decoders raise ``InvalidResponse`` for bytes that are not a valid value, nothing else.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import struct
from decimal import Decimal

from drivers.ble.gls import Need
from drivers.ble.sfloat import Special, decode_sfloat
from drivers.errors import InvalidResponse
from drivers.models import BloodPressureReading, BpStatus, PressureUnit, kpa_to_mmhg

SERVICE = 0x1810
MEASUREMENT = 0x2A35
FEATURE = 0x2A49
USER_UNKNOWN = 0xFF

_STATUS_BITS = (
    (0x0001, BpStatus.BODY_MOVEMENT),
    (0x0002, BpStatus.CUFF_LOOSE),
    (0x0004, BpStatus.IRREGULAR_PULSE),
    (0x0020, BpStatus.IMPROPER_POSITION),
)
_PULSE_RANGE = {1: BpStatus.PULSE_ABOVE_RANGE, 2: BpStatus.PULSE_BELOW_RANGE, 3: BpStatus.PULSE_RANGE_RESERVED}
FEATURES = {
    0x0001: "body movement detection",
    0x0002: "cuff fit detection",
    0x0004: "irregular pulse detection",
    0x0008: "pulse rate range detection",
    0x0010: "measurement position detection",
    0x0020: "multiple bond",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    """A Blood Pressure Measurement value as the cuff sent it (0x2A35)."""

    unit: PressureUnit
    systolic: Decimal | Special
    diastolic: Decimal | Special
    mean_arterial: Decimal | Special
    time: dt.datetime | None  # naive cuff-local; None when absent or "unknown" (year/month/day 0)
    pulse: Decimal | Special | None
    user_id: int | None
    status: frozenset[BpStatus] | None  # None: no status field


def _pressure(c: Need, field: str) -> Decimal | Special:
    return decode_sfloat(c.u16(field))


def decode_measurement(data: bytes) -> Measurement:
    c = Need(data, "blood pressure measurement")
    flags = c.u8("flags")
    unit = PressureUnit.KPA if flags & 0x01 else PressureUnit.MMHG
    systolic, diastolic, mean = (_pressure(c, f) for f in ("systolic", "diastolic", "mean arterial pressure"))
    time = c.date_time("time stamp") if flags & 0x02 else None
    pulse = _pressure(c, "pulse rate") if flags & 0x04 else None
    user = c.u8("user id") if flags & 0x08 else None
    status: frozenset[BpStatus] | None = None
    if flags & 0x10:
        bits = c.u16("measurement status")
        found = {s for bit, s in _STATUS_BITS if bits & bit}
        if (bits >> 3) & 0x3:
            found.add(_PULSE_RANGE[(bits >> 3) & 0x3])
        status = frozenset(found)
    return Measurement(unit, systolic, diastolic, mean, time, pulse, None if user == USER_UNKNOWN else user, status)


def decode_feature(data: bytes) -> list[str]:
    bits = Need(data, "blood pressure feature").u16("features")
    return [name for bit, name in FEATURES.items() if bits & bit]


def record_key(device: str, m: Measurement, received_at: dt.datetime) -> str:
    """The ledger key. BLS has no sequence number, so a stored measurement is recognised by what it is:
    user, cuff timestamp and the values. A measurement without a timestamp cannot be told from an
    identical one on another day, so its key also holds the minute the agent received it (a repeat within
    one connection is still dropped: drivers/ble/central.py compares the raw bytes)."""
    when = m.time.isoformat() if m.time else "received " + received_at.strftime("%Y-%m-%dT%H:%M")
    what = f"{device}|{m.user_id}|{when}|{m.unit}|{m.systolic}|{m.diastolic}|{m.mean_arterial}|{m.pulse}"
    return "bp:" + hashlib.sha256(what.encode()).hexdigest()[:32]


def _mmhg(value: Decimal, unit: PressureUnit) -> Decimal:
    return kpa_to_mmhg(value) if unit is PressureUnit.KPA else value


def to_reading(m: Measurement, device: str, received_at: dt.datetime) -> BloodPressureReading:
    """The verified reading; ``InvalidResponse`` when systolic or diastolic is not a number or out of range.
    A MAP or pulse that is a special value (NaN: the cuff does not compute it) becomes None."""
    for name, value in (("systolic", m.systolic), ("diastolic", m.diastolic)):
        if isinstance(value, Special):
            raise InvalidResponse(f"blood pressure measurement: {name} is {value.value}, not a number")
    assert isinstance(m.systolic, Decimal) and isinstance(m.diastolic, Decimal)
    mean = None if isinstance(m.mean_arterial, Special) else _mmhg(m.mean_arterial, m.unit)
    pulse = None if m.pulse is None or isinstance(m.pulse, Special) else m.pulse
    try:
        return BloodPressureReading(
            device_serial=device,
            record_key=record_key(device, m, received_at),
            device_time=m.time,
            systolic_mmhg=_mmhg(m.systolic, m.unit),
            diastolic_mmhg=_mmhg(m.diastolic, m.unit),
            map_mmhg=mean,
            native_unit=m.unit,
            native_values=(str(m.systolic), str(m.diastolic), str(m.mean_arterial)),
            pulse_bpm=pulse,
            user_id=m.user_id,
            status=m.status or frozenset(),
        )
    except ValueError as exc:
        raise InvalidResponse(f"blood pressure measurement: {exc}") from None


def encode_measurement(
    systolic: bytes,
    diastolic: bytes,
    mean_arterial: bytes,
    *,
    kpa: bool = False,
    time: dt.datetime | None = None,
    pulse: bytes | None = None,
    user_id: int | None = None,
    status: int | None = None,
) -> bytes:
    """The simulators' side; the pressures are SFLOAT bytes (``encode_sfloat``)."""
    flags = (
        (0x01 if kpa else 0)
        | (0x02 if time else 0)
        | (0x04 if pulse is not None else 0)
        | (0x08 if user_id is not None else 0)
        | (0x10 if status is not None else 0)
    )
    out = bytes([flags]) + systolic + diastolic + mean_arterial
    if time:
        out += struct.pack("<HBBBBB", time.year, time.month, time.day, time.hour, time.minute, time.second)
    if pulse is not None:
        out += pulse
    if user_id is not None:
        out += bytes([user_id])
    if status is not None:
        out += status.to_bytes(2, "little")
    return out
