"""Glucose Profile (GLS 1.0) codecs: pure functions over characteristic values, no Bluetooth stack.

Glucose Measurement 0x2A18, Measurement Context 0x2A34, Glucose Feature 0x2A51 and the Record Access
Control Point 0x2A52 (docs/ble.md has the field layouts and how they map). Every decoder raises an
``InvalidResponse`` (the drivers' decode error) for bytes that are not a valid value, and nothing else.
A measurement becomes a ``GlucoseReading`` only through ``to_reading``, which verifies the value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import struct
from decimal import Decimal

from drivers.ble.sfloat import NotANumber, sfloat_at
from drivers.errors import InvalidResponse
from drivers.models import GlucoseReading, Meal, RangeFlag, Unit, mmoll_to_mgdl

SERVICE = 0x1808
MEASUREMENT = 0x2A18
CONTEXT = 0x2A34
FEATURE = 0x2A51
RACP = 0x2A52
MGDL_PER_KGL = Decimal(100000)  # 1 kg/L = 10^6 mg / 10 dL


class Status(enum.IntFlag):
    """Sensor Status Annunciation (uint16) of a Glucose Measurement."""

    BATTERY_LOW = 1 << 0
    SENSOR_MALFUNCTION = 1 << 1
    SAMPLE_TOO_SMALL = 1 << 2
    STRIP_INSERTION_ERROR = 1 << 3
    STRIP_TYPE_INCORRECT = 1 << 4
    RESULT_HIGH = 1 << 5  # result higher than the device can process
    RESULT_LOW = 1 << 6
    TEMPERATURE_HIGH = 1 << 7
    TEMPERATURE_LOW = 1 << 8
    READ_INTERRUPTED = 1 << 9  # strip pulled too soon
    GENERAL_FAULT = 1 << 10
    TIME_FAULT = 1 << 11


#: The meter says its own result did not pass: the reading is kept but marked suspect.
SUSPECT = (
    Status.SENSOR_MALFUNCTION
    | Status.SAMPLE_TOO_SMALL
    | Status.STRIP_INSERTION_ERROR
    | Status.STRIP_TYPE_INCORRECT
    | Status.TEMPERATURE_HIGH
    | Status.TEMPERATURE_LOW
    | Status.READ_INTERRUPTED
    | Status.GENERAL_FAULT
)


class Feature(enum.IntFlag):
    """Glucose Feature (0x2A51): what the meter can detect (not bit-aligned with ``Status``)."""

    LOW_BATTERY_DETECTION = 1 << 0
    SENSOR_MALFUNCTION_DETECTION = 1 << 1
    SAMPLE_SIZE = 1 << 2
    STRIP_INSERTION_ERROR_DETECTION = 1 << 3
    STRIP_TYPE_ERROR_DETECTION = 1 << 4
    RESULT_HIGH_LOW_DETECTION = 1 << 5
    TEMPERATURE_HIGH_LOW_DETECTION = 1 << 6
    READ_INTERRUPT_DETECTION = 1 << 7
    GENERAL_DEVICE_FAULT = 1 << 8
    TIME_FAULT = 1 << 9
    MULTIPLE_BOND = 1 << 10


SAMPLE_TYPES = {
    1: "capillary whole blood",
    2: "capillary plasma",
    3: "venous whole blood",
    4: "venous plasma",
    5: "arterial whole blood",
    6: "arterial plasma",
    7: "undetermined whole blood",
    8: "undetermined plasma",
    9: "interstitial fluid",
    10: "control solution",
}
SAMPLE_LOCATIONS = {1: "finger", 2: "alternate site test", 3: "earlobe", 4: "control solution", 15: "not available"}
TYPE_CONTROL_SOLUTION = 10
LOCATION_CONTROL_SOLUTION = 4
CARBOHYDRATES = {1: "breakfast", 2: "lunch", 3: "dinner", 4: "snack", 5: "drink", 6: "supper", 7: "brunch"}
MEALS = {1: "preprandial", 2: "postprandial", 3: "fasting", 4: "casual", 5: "bedtime"}
_MEAL_FLAG = {1: Meal.BEFORE, 2: Meal.AFTER, 3: Meal.FASTING}
TESTERS = {1: "self", 2: "health care professional", 3: "lab test", 15: "not available"}
HEALTH = {
    1: "minor health issues",
    2: "major health issues",
    3: "during menses",
    4: "under stress",
    5: "no health issues",
}
MEDICATIONS = {
    1: "rapid acting insulin",
    2: "short acting insulin",
    3: "intermediate acting insulin",
    4: "long acting insulin",
    5: "pre-mixed insulin",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    """A Glucose Measurement value as the meter sent it (0x2A18)."""

    sequence: int
    base_time: dt.datetime  # naive meter-local
    time_offset_min: int  # 0 when absent
    concentration: Decimal | None  # in ``unit``; None when the meter sent no glucose data
    unit: str  # "kg/L" or "mol/L"
    sample_type: int | None
    sample_location: int | None
    status: Status | None  # None: no annunciation field
    context_follows: bool
    concentration_error: str | None = None  # the special value (NaN, NRes, ...) the field held instead

    @property
    def meter_time(self) -> dt.datetime:
        """The user-facing time: base time plus time offset."""
        return self.base_time + dt.timedelta(minutes=self.time_offset_min)

    @property
    def control_solution(self) -> bool:
        return self.sample_type == TYPE_CONTROL_SOLUTION or self.sample_location == LOCATION_CONTROL_SOLUTION


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """A Glucose Measurement Context value (0x2A34): what the patient entered about one measurement."""

    sequence: int
    carbohydrate: str | None = None
    carbohydrate_kg: Decimal | None = None
    meal: int | None = None
    tester: int | None = None
    health: int | None = None
    exercise_s: int | None = None  # 65535 on the wire: overrun
    exercise_intensity_pct: int | None = None
    medication: str | None = None
    medication_amount: Decimal | None = None
    medication_unit: str | None = None  # "kg" or "L"
    hba1c_pct: Decimal | None = None


class Need:
    """A cursor over a value that raises the decode error when the value ends early."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.what, self.at = bytes(data), what, 0

    def take(self, n: int, field: str) -> bytes:
        if self.at + n > len(self.data):
            raise InvalidResponse(f"{self.what}: {len(self.data)} bytes end before {field}")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def s16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little", signed=True)

    def sfloat(self, field: str) -> Decimal:
        return sfloat_at(self.take(2, field), 0, f"{self.what} {field}")

    def date_time(self, field: str) -> dt.datetime | None:
        """A Date Time (year uint16, month, day, hours, minutes, seconds); None when the date is "unknown" (0)."""
        year, month, day, hour, minute, second = struct.unpack("<HBBBBB", self.take(7, field))
        if year == 0 or month == 0 or day == 0:
            return None
        try:
            return dt.datetime(year, month, day, hour, minute, second)
        except ValueError as exc:
            raise InvalidResponse(f"{self.what}: {field} is not a date: {exc}") from None


def decode_measurement(data: bytes) -> Measurement:
    c = Need(data, "glucose measurement")
    flags = c.u8("flags")
    sequence = c.u16("sequence number")
    base_time = c.date_time("base time")
    if base_time is None:
        raise InvalidResponse(f"glucose measurement {sequence}: base time unknown (meter clock not set)")
    offset = c.s16("time offset") if flags & 0x01 else 0
    concentration: Decimal | None = None
    error: str | None = None
    sample_type = location = None
    if flags & 0x02:
        raw = c.take(2, "glucose concentration")
        try:
            concentration = sfloat_at(raw, 0, f"glucose measurement {sequence} concentration")
        except NotANumber as exc:
            error = exc.special.value
        type_location = c.u8("type-sample location")
        sample_type, location = type_location & 0x0F, type_location >> 4
    status = Status(c.u16("sensor status annunciation") & 0x0FFF) if flags & 0x08 else None
    return Measurement(
        sequence=sequence,
        base_time=base_time,
        time_offset_min=offset,
        concentration=concentration,
        unit="mol/L" if flags & 0x04 else "kg/L",
        sample_type=sample_type,
        sample_location=location,
        status=status,
        context_follows=bool(flags & 0x10),
        concentration_error=error,
    )


def decode_context(data: bytes) -> Context:
    c = Need(data, "glucose measurement context")
    flags = c.u8("flags")
    sequence = c.u16("sequence number")
    if flags & 0x80:
        c.u8("extended flags")  # reserved for future use: skipped, as the profile says
    fields: dict[str, object] = {}
    if flags & 0x01:
        carb = c.u8("carbohydrate id")
        fields["carbohydrate"] = CARBOHYDRATES.get(carb, f"reserved ({carb})")
        fields["carbohydrate_kg"] = c.sfloat("carbohydrate")
    if flags & 0x02:
        fields["meal"] = c.u8("meal")
    if flags & 0x04:
        tester_health = c.u8("tester-health")
        fields["tester"], fields["health"] = tester_health & 0x0F, tester_health >> 4
    if flags & 0x08:
        fields["exercise_s"] = c.u16("exercise duration")
        fields["exercise_intensity_pct"] = c.u8("exercise intensity")
    if flags & 0x10:
        med = c.u8("medication id")
        fields["medication"] = MEDICATIONS.get(med, f"reserved ({med})")
        fields["medication_amount"] = c.sfloat("medication")
        fields["medication_unit"] = "L" if flags & 0x20 else "kg"
    if flags & 0x40:
        fields["hba1c_pct"] = c.sfloat("HbA1c")
    return Context(sequence, **fields)  # type: ignore[arg-type]  # keys are Context's own field names


def decode_feature(data: bytes) -> Feature:
    """What the meter can detect (0x2A51); reserved bits are dropped."""
    return Feature(Need(data, "glucose feature").u16("features") & 0x07FF)


# --- Record Access Control Point ---------------------------------------------------------------------
class Op(enum.IntEnum):
    REPORT_RECORDS = 1
    DELETE_RECORDS = 2
    ABORT = 3
    REPORT_NUMBER = 4
    NUMBER_RESPONSE = 5
    RESPONSE_CODE = 6


class Operator(enum.IntEnum):
    NULL = 0
    ALL = 1
    LESS_OR_EQUAL = 2
    GREATER_OR_EQUAL = 3
    WITHIN_RANGE = 4
    FIRST = 5
    LAST = 6


FILTER_SEQUENCE = 0x01


class Response(enum.IntEnum):
    SUCCESS = 1
    OP_CODE_NOT_SUPPORTED = 2
    INVALID_OPERATOR = 3
    OPERATOR_NOT_SUPPORTED = 4
    INVALID_OPERAND = 5
    NO_RECORDS_FOUND = 6
    ABORT_UNSUCCESSFUL = 7
    PROCEDURE_NOT_COMPLETED = 8
    OPERAND_NOT_SUPPORTED = 9


RESPONSE_TEXT = {
    Response.SUCCESS: "success",
    Response.OP_CODE_NOT_SUPPORTED: "op code not supported",
    Response.INVALID_OPERATOR: "invalid operator",
    Response.OPERATOR_NOT_SUPPORTED: "operator not supported",
    Response.INVALID_OPERAND: "invalid operand",
    Response.NO_RECORDS_FOUND: "no records found",
    Response.ABORT_UNSUCCESSFUL: "abort unsuccessful",
    Response.PROCEDURE_NOT_COMPLETED: "procedure not completed",
    Response.OPERAND_NOT_SUPPORTED: "operand not supported",
}


@dataclasses.dataclass(frozen=True, slots=True)
class RacpReply:
    """What the meter indicated on the RACP: a response code to ``request``, or a number of records."""

    op: Op
    request: int | None = None  # the request op code a RESPONSE_CODE answers
    code: int | None = None  # a ``Response`` value, or an unknown one kept as is
    number: int | None = None

    def describe(self) -> str:
        if self.op is Op.NUMBER_RESPONSE:
            return f"{self.number} records"
        try:
            text = RESPONSE_TEXT[Response(self.code or 0)]
        except ValueError:
            text = f"unknown response code {self.code}"
        return f"{text} (to op code {self.request})"


def report_from(sequence: int) -> bytes:
    """Report stored records with sequence number >= ``sequence``."""
    return bytes([Op.REPORT_RECORDS, Operator.GREATER_OR_EQUAL, FILTER_SEQUENCE]) + sequence.to_bytes(2, "little")


def report_all() -> bytes:
    return bytes([Op.REPORT_RECORDS, Operator.ALL])


def report_number_from(sequence: int) -> bytes:
    return bytes([Op.REPORT_NUMBER, Operator.GREATER_OR_EQUAL, FILTER_SEQUENCE]) + sequence.to_bytes(2, "little")


def abort() -> bytes:
    return bytes([Op.ABORT, Operator.NULL])


def response(request: int, code: Response | int) -> bytes:
    return bytes([Op.RESPONSE_CODE, Operator.NULL, request, int(code)])


def number_response(number: int) -> bytes:
    return bytes([Op.NUMBER_RESPONSE, Operator.NULL]) + number.to_bytes(2, "little")


def decode_racp(data: bytes) -> RacpReply:
    """A value the meter indicated on the RACP (a response code or a number of stored records)."""
    c = Need(data, "RACP reply")
    op, operator = c.u8("op code"), c.u8("operator")
    if operator != Operator.NULL:
        raise InvalidResponse(f"RACP reply: operator {operator} where the profile requires Null (0)")
    if op == Op.RESPONSE_CODE:
        return RacpReply(Op.RESPONSE_CODE, request=c.u8("request op code"), code=c.u8("response code value"))
    if op == Op.NUMBER_RESPONSE:
        rest = len(data) - 2
        if rest not in (1, 2, 4):  # the profile says uint16; some meters send uint8 or uint32
            raise InvalidResponse(f"RACP reply: number of records in {rest} bytes")
        return RacpReply(Op.NUMBER_RESPONSE, number=int.from_bytes(c.take(rest, "number"), "little"))
    raise InvalidResponse(f"RACP reply: op code {op} is not a response")


@dataclasses.dataclass(frozen=True, slots=True)
class RacpRequest:
    op: int
    operator: int
    filter_type: int | None
    operand: bytes


def decode_racp_request(data: bytes) -> RacpRequest:
    """A request the collector wrote (the simulators' side)."""
    c = Need(data, "RACP request")
    op, operator = c.u8("op code"), c.u8("operator")
    rest = bytes(data[2:])
    return RacpRequest(op, operator, rest[0] if rest else None, rest[1:])


# --- to the canonical reading ------------------------------------------------------------------------
def record_key(m: Measurement) -> str:
    """The ledger key: sequence number and base time, so a meter whose numbering restarts (reset,
    battery change, replaced meter with the same address) is not mistaken for one already read."""
    return f"gls:{m.sequence}:{m.base_time.isoformat()}"


def to_mgdl(m: Measurement) -> int:
    if m.concentration is None:
        raise InvalidResponse(f"glucose measurement {m.sequence}: no glucose concentration")
    if m.unit == "kg/L":
        value = int((m.concentration * MGDL_PER_KGL).quantize(Decimal(1), rounding="ROUND_HALF_UP"))
    else:
        value = mmoll_to_mgdl(m.concentration * 1000)
    if not 0 <= value <= 2000:
        raise InvalidResponse(f"glucose measurement {m.sequence}: {m.concentration} {m.unit} is not a glucose value")
    return value


def _status_names(status: Status) -> list[str]:
    return [s.name.lower().replace("_", "-") for s in Status if s in status and s.name]


def to_reading(m: Measurement, context: Context | None, meter_serial: str) -> GlucoseReading:
    """The verified reading of a measurement (with its context, if the meter sent one); raises
    ``InvalidResponse`` when the measurement holds no usable value (absent, NaN, out of range)."""
    if m.concentration_error:
        raise InvalidResponse(f"glucose measurement {m.sequence}: concentration is {m.concentration_error}")
    value = to_mgdl(m)
    status = m.status or Status(0)
    flag = RangeFlag.IN_RANGE
    if Status.RESULT_HIGH in status and Status.RESULT_LOW in status:
        raise InvalidResponse(f"glucose measurement {m.sequence}: both above and below range")
    if Status.RESULT_HIGH in status:
        flag = RangeFlag.HIGH
    elif Status.RESULT_LOW in status:
        flag = RangeFlag.LOW
    comment = _status_names(status & ~(Status.RESULT_HIGH | Status.RESULT_LOW))
    meal = Meal.NONE
    if context is not None:
        meal = _MEAL_FLAG.get(context.meal or 0, Meal.NONE)
        if context.meal in (4, 5):
            comment.append(MEALS[context.meal])
    if m.unit == "mol/L":
        native, unit = str((m.concentration or Decimal(0)) * 1000), Unit.MMOLL
    else:
        native, unit = str(value), Unit.MGDL
    return GlucoseReading(
        meter_serial=meter_serial,
        record_key=record_key(m),
        meter_time=m.meter_time,
        value_mgdl=value,
        native_value=native,
        native_unit=unit,
        range_flag=flag,
        control_solution=m.control_solution,
        meal=meal,
        comment=" ".join(comment),
        suspect=bool(status & SUSPECT),
    )


# --- encoders: the simulators' side ------------------------------------------------------------------
def _date_time(t: dt.datetime) -> bytes:
    return struct.pack("<HBBBBB", t.year, t.month, t.day, t.hour, t.minute, t.second)


def encode_measurement(
    sequence: int,
    base_time: dt.datetime,
    concentration: bytes | None,
    *,
    mol_per_l: bool = False,
    time_offset_min: int | None = None,
    sample_type: int = 2,
    sample_location: int = 1,
    status: int | None = None,
    context_follows: bool = False,
) -> bytes:
    """``concentration``: the 2 SFLOAT bytes (``encode_sfloat``), so a simulator can send any special."""
    flags = (
        (0x01 if time_offset_min is not None else 0)
        | (0x02 if concentration is not None else 0)
        | (0x04 if mol_per_l else 0)
        | (0x08 if status is not None else 0)
        | (0x10 if context_follows else 0)
    )
    out = bytes([flags]) + sequence.to_bytes(2, "little") + _date_time(base_time)
    if time_offset_min is not None:
        out += time_offset_min.to_bytes(2, "little", signed=True)
    if concentration is not None:
        out += concentration + bytes([(sample_location << 4) | sample_type])
    if status is not None:
        out += status.to_bytes(2, "little")
    return out


def encode_context_meal(sequence: int, meal: int) -> bytes:
    return bytes([0x02]) + sequence.to_bytes(2, "little") + bytes([meal])
