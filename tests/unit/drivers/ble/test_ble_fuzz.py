"""Arbitrary bytes into every GLS/BLS characteristic decoder: the driver's decode error or a value whose
reading verifies; never another exception, never a reading that breaks its own invariants."""

from __future__ import annotations

import contextlib
import datetime as dt
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble import bls, gls
from drivers.ble.sfloat import Special, decode_float, decode_sfloat, encode_sfloat
from drivers.errors import InvalidResponse
from drivers.models import BloodPressureReading, GlucoseReading

FAST = settings(max_examples=400, deadline=None)
NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


@FAST
@given(st.binary(max_size=40))
def test_glucose_measurement_and_context(data: bytes) -> None:
    try:
        m = gls.decode_measurement(data)
    except InvalidResponse:
        pass
    else:
        try:
            ctx = gls.decode_context(data)
        except InvalidResponse:
            ctx = None
        try:
            r = gls.to_reading(m, ctx, "M")
        except InvalidResponse:
            return
        assert isinstance(r, GlucoseReading)
        assert m.concentration is not None and m.concentration_error is None
        assert 0 <= r.value_mgdl <= 2000


@FAST
@given(st.binary(max_size=40))
def test_context_feature_racp(data: bytes) -> None:
    for decode in (gls.decode_context, gls.decode_feature, gls.decode_racp, bls.decode_feature):
        with contextlib.suppress(InvalidResponse):
            decode(data)


@FAST
@given(st.binary(max_size=40))
def test_blood_pressure_measurement(data: bytes) -> None:
    try:
        m = bls.decode_measurement(data)
        r = bls.to_reading(m, "C", NOW)
    except InvalidResponse:
        return
    assert isinstance(r, BloodPressureReading)
    assert not isinstance(m.systolic, Special) and not isinstance(m.diastolic, Special)


@FAST
@given(st.integers(0, 0xFFFF))
def test_sfloat_every_value_decodes_and_numbers_round_trip(raw: int) -> None:
    value = decode_sfloat(raw)
    if isinstance(value, Decimal):
        assert decode_sfloat(int.from_bytes(encode_sfloat(value), "little")) == value


@FAST
@given(st.integers(0, 0xFFFFFFFF))
def test_float32_every_value_decodes(raw: int) -> None:
    assert isinstance(decode_float(raw), Decimal | Special)
