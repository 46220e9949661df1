"""GLS/BLS codecs on byte-level vectors laid out from the profile specifications (GLS 1.0, BLS 1.0,
IEEE 11073-20601 medical floats).

Cross-check: every vector marked "Nordic" is the byte string of a test in NordicSemiconductor's
Android-BLE-Common-Library (ble-common/src/test/.../callback/): GlucoseMeasurementDataCallbackTest
(onGlucoseMeasurementReceived, onInvalidDataReceived), GlucoseMeasurementContextDataCallbackTest
(_full, _empty, onInvalidDataReceived), GlucoseFeatureDataCallbackTest, BloodPressureMeasurementDataCallbackTest
(_full, _some, _minimal, onInvalidDataReceived_toShort, _noTimestamp) and
RecordAccessControlPointDataCallbackTest (every case). Our decoders were written from the field layouts and
must agree with what those tests assert; where we deliberately differ (a Date Time with year 0 is
"unknown", not a partial date; 30 kg/L is not a glucose value) the test says so.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import pytest

from drivers.ble import bls, gls
from drivers.ble.sfloat import NotANumber, Special, decode_float, decode_sfloat, encode_sfloat, sfloat_at
from drivers.errors import InvalidResponse
from drivers.models import BpStatus, Meal, PressureUnit, RangeFlag, Unit


# --- IEEE 11073 SFLOAT / FLOAT ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "special"),
    [
        (0x07FF, Special.NAN),
        (0x0800, Special.NRES),
        (0x07FE, Special.POS_INFINITY),
        (0x0802, Special.NEG_INFINITY),
        (0x0801, Special.RESERVED),
        (0xF7FF, Special.NAN),  # a special mantissa with a non-zero exponent is still not a number
    ],
)
def test_sfloat_special_values_are_never_numbers(raw: int, special: Special) -> None:
    assert decode_sfloat(raw) is special
    with pytest.raises(NotANumber, match=re.escape(special.value)):
        sfloat_at(raw.to_bytes(2, "little"), 0, "x")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (0x0000, Decimal(0)),
        (0x0064, Decimal(100)),
        (0xF0BD, Decimal("18.9")),  # Nordic BPM _some: setValue(189, -1, SFLOAT) -> BD F0
        (0xF04D, Decimal("7.7")),
        (0xE226, Decimal("5.50")),  # 550 x 10^-2
        (0x0FFF, Decimal(-1)),  # mantissa is two's complement 12-bit
        (0x87FD, Decimal("2045E-8")),
        (0x77FD, Decimal("2045E7")),
    ],
)
def test_sfloat_values(raw: int, value: Decimal) -> None:
    assert decode_sfloat(raw) == value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (0x007FFFFF, Special.NAN),
        (0x00800000, Special.NRES),
        (0x007FFFFE, Special.POS_INFINITY),
        (0x00800002, Special.NEG_INFINITY),
        (0x00800001, Special.RESERVED),
        (0xFE003039, Decimal("123.45")),
        (0x00FFFFFF, Decimal(-1)),
    ],
)
def test_float32(raw: int, value: Decimal | Special) -> None:
    assert decode_float(raw) == value


@pytest.mark.parametrize("value", ["0", "5.6", "-1", "18.9", "0.0082", "2045", "123.5", "3E+8"])
def test_encode_sfloat_round_trips_exactly(value: str) -> None:
    assert decode_sfloat(int.from_bytes(encode_sfloat(Decimal(value)), "little")) == Decimal(value)


@pytest.mark.parametrize("value", ["2046", "123.45", "1E+20"])
def test_encode_sfloat_refuses_what_it_cannot_hold(value: str) -> None:
    with pytest.raises(ValueError, match="no exact SFLOAT"):
        encode_sfloat(Decimal(value))


# --- Glucose Measurement -----------------------------------------------------------------------------
NORDIC_GLS = bytes([0b011011, 1, 0, 0xE3, 0x07, 2, 27, 11, 10, 30, 0xFB, 0xFF, 30, 0, 0x12, 0b101, 0b1])


def test_nordic_glucose_measurement_fields() -> None:
    m = gls.decode_measurement(NORDIC_GLS)
    assert m.sequence == 1
    assert m.base_time == dt.datetime(2019, 2, 27, 11, 10, 30)
    assert m.time_offset_min == -5
    assert m.meter_time == dt.datetime(2019, 2, 27, 11, 5, 30)  # Nordic asserts minute 5
    assert (m.concentration, m.unit) == (Decimal(30), "kg/L")
    assert (m.sample_type, m.sample_location) == (2, 1)  # capillary plasma, finger
    assert m.status is not None
    assert int(m.status) == 261  # Nordic: status.value 261, battery low, no general device fault
    assert m.status == gls.Status.BATTERY_LOW | gls.Status.SAMPLE_TOO_SMALL | gls.Status.TEMPERATURE_LOW
    assert gls.Status.GENERAL_FAULT not in m.status
    assert m.context_follows


def test_nordic_vector_30_kg_per_l_is_not_a_reading() -> None:
    # 30 kg/L = 3,000,000 mg/dL: the Nordic test does not look at the value; we must refuse it.
    with pytest.raises(InvalidResponse, match="not a glucose value"):
        gls.to_reading(gls.decode_measurement(NORDIC_GLS), None, "M1")


def test_nordic_glucose_measurement_missing_time_offset_is_invalid() -> None:
    data = bytes([0b011011, 0, 0, 0xE2, 0x07, 4, 26, 11, 9, 30, 30, 0, 0x12, 0b101, 0b1])
    with pytest.raises(InvalidResponse, match="end before"):
        gls.decode_measurement(data)


def _measurement(conc: bytes | None, **kw: object) -> bytes:
    return gls.encode_measurement(7, dt.datetime(2026, 3, 1, 8, 30, 0), conc, **kw)  # type: ignore[arg-type]


def test_kg_per_l_to_mgdl() -> None:
    # 0.00105 kg/L = 105 mg/dL: mantissa 105, exponent -5 -> 0xB069
    data = bytes([0x02, 7, 0, 0xEA, 0x07, 3, 1, 8, 30, 0, 0x69, 0xB0, 0x11])
    assert data == _measurement(bytes([0x69, 0xB0]), sample_type=1, sample_location=1)
    r = gls.to_reading(gls.decode_measurement(data), None, "M1")
    assert (r.value_mgdl, r.native_value, r.native_unit) == (105, "105", Unit.MGDL)
    assert r.record_key == "gls:7:2026-03-01T08:30:00"
    assert r.meter_time == dt.datetime(2026, 3, 1, 8, 30)
    assert (r.range_flag, r.control_solution, r.suspect) == (RangeFlag.IN_RANGE, False, False)


def test_mol_per_l_to_mgdl_with_the_project_factor() -> None:
    # 0.0056 mol/L = 5.6 mmol/L -> 5.6 x 18.0156 = 100.887 -> 101 mg/dL; 56 x 10^-4 -> 0xC038
    data = _measurement(bytes([0x38, 0xC0]), mol_per_l=True)
    assert data[0] == 0x06
    r = gls.to_reading(gls.decode_measurement(data), None, "M1")
    assert (r.value_mgdl, r.native_value, r.native_unit) == (101, "5.6000", Unit.MMOLL)


@pytest.mark.parametrize("special", list(Special))
def test_concentration_special_value_is_never_a_reading(special: Special) -> None:
    m = gls.decode_measurement(_measurement(encode_sfloat(special)))
    assert m.concentration is None
    assert m.concentration_error == special.value
    with pytest.raises(InvalidResponse, match=re.escape(f"concentration is {special.value}")):
        gls.to_reading(m, None, "M1")


def test_measurement_without_glucose_data_is_not_a_reading() -> None:
    m = gls.decode_measurement(_measurement(None, status=int(gls.Status.STRIP_INSERTION_ERROR)))
    with pytest.raises(InvalidResponse, match="no glucose concentration"):
        gls.to_reading(m, None, "M1")


@pytest.mark.parametrize(
    ("status", "flag"),
    [(gls.Status.RESULT_HIGH, RangeFlag.HIGH), (gls.Status.RESULT_LOW, RangeFlag.LOW)],
)
def test_result_above_below_range_gives_the_serial_meters_flags(status: gls.Status, flag: RangeFlag) -> None:
    r = gls.to_reading(
        gls.decode_measurement(_measurement(encode_sfloat(Decimal("0.006")), status=int(status))), None, "M"
    )
    assert (r.range_flag, r.value_mgdl) == (flag, 600)


def test_strip_errors_mark_suspect_and_battery_low_is_a_comment() -> None:
    status = gls.Status.BATTERY_LOW | gls.Status.STRIP_TYPE_INCORRECT
    r = gls.to_reading(
        gls.decode_measurement(_measurement(encode_sfloat(Decimal("0.00099")), status=int(status))), None, "M"
    )
    assert r.suspect
    assert r.comment == "battery-low strip-type-incorrect"
    ok = gls.to_reading(gls.decode_measurement(_measurement(encode_sfloat(Decimal("0.00099")), status=1)), None, "M")
    assert (ok.suspect, ok.comment, ok.value_mgdl) == (False, "battery-low", 99)


@pytest.mark.parametrize(("sample_type", "location"), [(10, 1), (2, 4), (10, 4)])
def test_control_solution_is_marked(sample_type: int, location: int) -> None:
    data = _measurement(encode_sfloat(Decimal("0.00120")), sample_type=sample_type, sample_location=location)
    assert gls.to_reading(gls.decode_measurement(data), None, "M").control_solution


def test_base_time_unknown_is_refused() -> None:
    data = bytes([0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(InvalidResponse, match="base time unknown"):
        gls.decode_measurement(data)


def test_impossible_date_is_a_decode_error() -> None:
    with pytest.raises(InvalidResponse, match="not a date"):
        gls.decode_measurement(bytes([0x00, 1, 0, 0xEA, 0x07, 2, 30, 0, 0, 0]))


# --- Measurement Context -----------------------------------------------------------------------------
NORDIC_CONTEXT_FULL = bytes(
    [0xFF, 0, 0, 0xB3, 3, 0x64, 0x00, 4, 0x12, 60, 0, 50, 4, 0xD3, 0xF4, 0x59, 0xF1]
)  # carbs 100 (0x0064), medication 123.5 (1235e-1: SFLOAT cannot hold 123.45), HbA1c 34.5 (345e-1)


def test_nordic_context_full() -> None:
    c = gls.decode_context(NORDIC_CONTEXT_FULL)
    assert c.sequence == 0
    assert (c.carbohydrate, c.carbohydrate_kg) == ("dinner", Decimal(100))
    assert gls.MEALS[c.meal or 0] == "casual"
    assert gls.TESTERS[c.tester or 0] == "health care professional"
    assert gls.HEALTH[c.health or 0] == "minor health issues"
    assert (c.exercise_s, c.exercise_intensity_pct) == (60, 50)
    assert (c.medication, c.medication_amount, c.medication_unit) == ("long acting insulin", Decimal("123.5"), "L")
    assert c.hba1c_pct == Decimal("34.5")


def test_nordic_context_empty_and_truncated() -> None:
    assert gls.decode_context(bytes([0, 1, 0]) + bytes(14)) == gls.Context(sequence=1)
    with pytest.raises(InvalidResponse):
        gls.decode_context(NORDIC_CONTEXT_FULL[:5])


def test_context_meal_maps_to_the_reading() -> None:
    m = gls.decode_measurement(_measurement(encode_sfloat(Decimal("0.00140")), context_follows=True))
    for meal, expected in ((1, Meal.BEFORE), (2, Meal.AFTER), (3, Meal.FASTING), (4, Meal.NONE)):
        ctx = gls.decode_context(gls.encode_context_meal(7, meal))
        assert gls.to_reading(m, ctx, "M").meal is expected
    assert gls.to_reading(m, gls.decode_context(gls.encode_context_meal(7, 5)), "M").comment == "bedtime"
    assert gls.to_reading(m, None, "M").meal is Meal.NONE  # measurement without context


# --- Feature, RACP -----------------------------------------------------------------------------------
def test_nordic_glucose_feature() -> None:
    features = gls.decode_feature(bytes([0b11110000, 0b00000011]))
    F = gls.Feature
    assert features == (
        F.STRIP_TYPE_ERROR_DETECTION
        | F.RESULT_HIGH_LOW_DETECTION
        | F.TEMPERATURE_HIGH_LOW_DETECTION
        | F.READ_INTERRUPT_DETECTION
        | F.GENERAL_DEVICE_FAULT
        | F.TIME_FAULT
    )
    assert F.LOW_BATTERY_DETECTION not in features and F.MULTIPLE_BOND not in features
    with pytest.raises(InvalidResponse):
        gls.decode_feature(b"")


@pytest.mark.parametrize(
    ("data", "request_op", "code", "text"),
    [
        ([6, 0, 1, 1], 1, 1, "success"),
        ([6, 0, 12, 2], 12, 2, "op code not supported"),
        ([6, 0, 1, 3], 1, 3, "invalid operator"),
        ([6, 0, 2, 4], 2, 4, "operator not supported"),
        ([6, 0, 1, 5], 1, 5, "invalid operand"),
        ([6, 0, 1, 6], 1, 6, "no records found"),
        ([6, 0, 3, 7], 3, 7, "abort unsuccessful"),
        ([6, 0, 2, 8], 2, 8, "procedure not completed"),
        ([6, 0, 2, 9], 2, 9, "operand not supported"),
        ([6, 0, 1, 10], 1, 10, "unknown response code 10"),
    ],
)
def test_nordic_racp_response_codes(data: list[int], request_op: int, code: int, text: str) -> None:
    reply = gls.decode_racp(bytes(data))
    assert (reply.op, reply.request, reply.code) == (gls.Op.RESPONSE_CODE, request_op, code)
    assert reply.describe().startswith(text)


@pytest.mark.parametrize(("data", "number"), [([5, 0, 1], 1), ([5, 0, 2, 1], 258), ([5, 0, 4, 3, 2, 1], 16909060)])
def test_nordic_racp_number_of_records(data: list[int], number: int) -> None:
    assert gls.decode_racp(bytes(data)).number == number


@pytest.mark.parametrize("data", [[5, 0, 3, 2, 1], [1, 1], [1, 3, 1, 2, 0], [6, 1, 1]])
def test_nordic_racp_invalid(data: list[int]) -> None:
    with pytest.raises(InvalidResponse):
        gls.decode_racp(bytes(data))


def test_racp_requests() -> None:
    assert gls.report_from(0x1234) == bytes([0x01, 0x03, 0x01, 0x34, 0x12])
    assert gls.report_all() == bytes([0x01, 0x01])
    assert gls.abort() == bytes([0x03, 0x00])
    assert gls.report_number_from(5) == bytes([0x04, 0x03, 0x01, 5, 0])
    req = gls.decode_racp_request(gls.report_from(300))
    assert (req.op, req.operator, req.filter_type, req.operand) == (1, 3, 1, (300).to_bytes(2, "little"))


# --- Blood Pressure ----------------------------------------------------------------------------------
NORDIC_BPM_FULL = bytes(
    [0x1E, 0x8A, 0x00, 0x58, 0x00, 0x78, 0x00, 0x00, 0x00, 0x04, 0x11, 0x14, 0x29, 0x3B, 0x3C, 0x00, 0x01, 0x27, 0x00]
)
NORDIC_BPM_SOME = bytes([0x15, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0, 0x3C, 0x00, 0x12, 0x00])
NORDIC_BPM_MINIMAL = bytes([0x00, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0])
NOW = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


def test_nordic_bpm_full() -> None:
    m = bls.decode_measurement(NORDIC_BPM_FULL)
    assert (m.unit, m.systolic, m.diastolic, m.mean_arterial) == (PressureUnit.MMHG, 138, 88, 120)
    assert (m.pulse, m.user_id) == (60, 1)
    assert m.status == {
        BpStatus.BODY_MOVEMENT,
        BpStatus.CUFF_LOOSE,
        BpStatus.IRREGULAR_PULSE,
        BpStatus.IMPROPER_POSITION,
    }
    # Nordic keeps month/day of a year-0 Date Time; for us an unknown year is an unknown time.
    assert m.time is None
    r = bls.to_reading(m, "C1", NOW)
    assert (r.systolic_mmhg, r.diastolic_mmhg, r.map_mmhg, r.pulse_bpm) == (138, 88, 120, 60)


def test_nordic_bpm_some_kpa_converted_with_unit_kept() -> None:
    m = bls.decode_measurement(NORDIC_BPM_SOME)
    assert (m.unit, m.systolic, m.diastolic, m.mean_arterial, m.pulse) == (
        PressureUnit.KPA,
        Decimal("18.9"),
        11,
        Decimal("15.9"),
        60,
    )
    assert m.user_id is None
    assert m.status == {BpStatus.CUFF_LOOSE, BpStatus.PULSE_BELOW_RANGE}
    r = bls.to_reading(m, "C1", NOW)
    assert (r.systolic_mmhg, r.diastolic_mmhg, r.map_mmhg) == (Decimal("141.8"), Decimal("82.5"), Decimal("119.3"))
    assert (r.native_unit, r.native_values) == (PressureUnit.KPA, ("18.9", "11", "15.9"))


def test_nordic_bpm_minimal_and_invalid() -> None:
    m = bls.decode_measurement(NORDIC_BPM_MINIMAL)
    assert (m.unit, m.pulse, m.user_id, m.status, m.time) == (PressureUnit.MMHG, None, None, None, None)
    for bad in (bytes([1, 2, 3, 4, 5, 6]), bytes([3, 2, 3, 4, 5, 6, 7])):
        with pytest.raises(InvalidResponse):
            bls.decode_measurement(bad)


def _bp(**kw: object) -> bytes:
    e = encode_sfloat
    return bls.encode_measurement(e(Decimal(128)), e(Decimal(84)), e(Decimal(99)), **kw)  # type: ignore[arg-type]


def test_bp_status_pulse_range_bits() -> None:
    for bits, expected in (
        (0x08, BpStatus.PULSE_ABOVE_RANGE),
        (0x10, BpStatus.PULSE_BELOW_RANGE),
        (0x18, BpStatus.PULSE_RANGE_RESERVED),
    ):
        assert bls.decode_measurement(_bp(status=bits)).status == {expected}


def test_bp_specials() -> None:
    nan_map = bls.encode_measurement(
        encode_sfloat(Decimal(120)),
        encode_sfloat(Decimal(80)),
        encode_sfloat(Special.NAN),
        pulse=encode_sfloat(Special.NRES),
    )
    r = bls.to_reading(bls.decode_measurement(nan_map), "C", NOW)
    assert (r.map_mmhg, r.pulse_bpm, r.native_values[2]) == (None, None, "NaN")
    nan_sys = bls.encode_measurement(
        encode_sfloat(Special.POS_INFINITY), encode_sfloat(Decimal(80)), encode_sfloat(Decimal(90))
    )
    with pytest.raises(InvalidResponse, match="systolic is"):
        bls.to_reading(bls.decode_measurement(nan_sys), "C", NOW)
    with pytest.raises(InvalidResponse, match="out of range"):
        bls.to_reading(bls.decode_measurement(_bp(pulse=encode_sfloat(Decimal(-5)))), "C", NOW)


def test_bp_record_key_is_the_measurement_not_the_moment_read() -> None:
    t = dt.datetime(2026, 3, 1, 7, 45)
    a = bls.to_reading(bls.decode_measurement(_bp(time=t, user_id=2)), "C", NOW)
    b = bls.to_reading(bls.decode_measurement(_bp(time=t, user_id=2)), "C", NOW + dt.timedelta(days=3))
    assert a.record_key == b.record_key
    assert a.device_time == t and a.user_id == 2
    other_user = bls.to_reading(bls.decode_measurement(_bp(time=t, user_id=3)), "C", NOW)
    assert other_user.record_key != a.record_key
    # no timestamp: the minute received is part of the key (identical values on another day are kept)
    c = bls.to_reading(bls.decode_measurement(_bp()), "C", NOW)
    d = bls.to_reading(bls.decode_measurement(_bp()), "C", NOW + dt.timedelta(days=1))
    assert c.record_key != d.record_key
    assert bls.decode_measurement(_bp(user_id=255)).user_id is None


def test_bp_feature() -> None:
    assert bls.decode_feature(bytes([0x25, 0x00])) == [
        "body movement detection",
        "irregular pulse detection",
        "multiple bond",
    ]
