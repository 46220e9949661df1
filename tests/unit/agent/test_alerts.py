"""Table tests for the clinical alert rule (agent.buffer.intake.glucose_alerts).

Defaults: severe hypo below 54 mg/dL, hypo below 70, hyper above 250 (docs: README, config
``alerts.*``). Each threshold is checked on both sides and on the value itself; mmol/L inputs go
through the one conversion (drivers.models.mmoll_to_mgdl) and the Contour decoder's reading builder,
as they do on the box; the meters' HIGH/LOW flags alert whatever the stored limit is; a
control-solution result never alerts.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from agent.buffer.intake import glucose_alerts
from agent.config import AlertsSection
from drivers import contour_astm
from drivers.models import GlucoseReading, RangeFlag, Unit, mmoll_to_mgdl

WHEN = dt.datetime(2026, 3, 1, 7, 30)
DEFAULT = AlertsSection()


def reading(
    mgdl: int,
    *,
    flag: RangeFlag = RangeFlag.IN_RANGE,
    control: bool = False,
    native: str | None = None,
    unit: Unit = Unit.MGDL,
) -> GlucoseReading:
    return GlucoseReading(
        meter_serial="SN1",
        record_key=f"SN1:{mgdl}:{flag}:{control}",
        meter_time=WHEN,
        value_mgdl=mgdl,
        native_value=native if native is not None else str(mgdl),
        native_unit=unit,
        range_flag=flag,
        control_solution=control,
    )


def codes(r: GlucoseReading, limits: AlertsSection = DEFAULT) -> list[str]:
    return [code for code, _message in glucose_alerts(r, limits)]


def test_defaults_are_the_documented_thresholds() -> None:
    assert (DEFAULT.severe_hypo_mgdl, DEFAULT.hypo_mgdl, DEFAULT.hyper_mgdl) == (54, 70, 250)


@pytest.mark.parametrize(
    ("mgdl", "expected"),
    [
        (0, ["hypo_severe"]),
        (20, ["hypo_severe"]),
        (53, ["hypo_severe"]),
        (54, ["hypo"]),  # severe is strictly below 54
        (55, ["hypo"]),
        (69, ["hypo"]),
        (70, []),  # hypo is strictly below 70
        (71, []),
        (120, []),
        (249, []),
        (250, []),  # hyper is strictly above 250
        (251, ["hyper"]),
        (600, ["hyper"]),
    ],
)
def test_mgdl_boundaries(mgdl: int, expected: list[str]) -> None:
    assert codes(reading(mgdl)) == expected


@pytest.mark.parametrize(
    ("mmoll", "mgdl", "expected"),
    [
        ("1.1", 20, ["hypo_severe"]),
        ("2.9", 52, ["hypo_severe"]),
        ("2.99", 54, ["hypo"]),  # 53.87 rounds half-up to 54
        ("3.0", 54, ["hypo"]),  # 54.05: level 2 hypoglycaemia is below 3.0 mmol/L
        ("3.1", 56, ["hypo"]),
        ("3.8", 68, ["hypo"]),
        ("3.88", 70, []),  # 69.90 rounds to 70
        ("3.9", 70, []),  # 70.26: level 1 is below 3.9 mmol/L
        ("4.0", 72, []),
        ("13.8", 249, []),
        ("13.9", 250, []),  # 250.42
        ("14.0", 252, ["hyper"]),
        ("33.3", 600, ["hyper"]),
    ],
)
def test_mmoll_boundaries(mmoll: str, mgdl: int, expected: list[str]) -> None:
    converted = mmoll_to_mgdl(Decimal(mmoll))
    assert converted == mgdl
    assert codes(reading(converted, native=mmoll, unit=Unit.MMOLL)) == expected


@pytest.mark.parametrize(
    ("value", "unit", "markers", "expected"),
    [
        ("2.9", "mmol/L", (), ["hypo_severe"]),
        ("3.0", "mmol/L", (), ["hypo"]),
        ("3.9", "mmol/L", (), []),
        ("14.0", "mmol/L", (), ["hyper"]),
        ("53", "mg/dL", (), ["hypo_severe"]),
        ("251", "mg/dL", (), ["hyper"]),
        ("600", "mg/dL", (contour_astm.MARK_HIGH,), ["hyper"]),
        ("10", "mg/dL", (contour_astm.MARK_LOW,), ["hypo_severe"]),
        ("33.3", "mmol/L", (contour_astm.MARK_HIGH,), ["hyper"]),
        ("0.6", "mmol/L", (contour_astm.MARK_LOW,), ["hypo_severe"]),
        ("45", "mg/dL", (contour_astm.MARK_CONTROL,), []),
        ("300", "mg/dL", (contour_astm.MARK_CONTROL,), []),
    ],
)
def test_decoded_contour_results(value: str, unit: str, markers: tuple[str, ...], expected: list[str]) -> None:
    """The same rule on readings built by a real decoder (units, HIGH/LOW and control marks)."""
    r = contour_astm.make_reading("SN1", WHEN, value, unit, markers, (10, 600))
    assert codes(r) == expected


@pytest.mark.parametrize(
    ("flag", "limit", "limits", "expected"),
    [
        # LOW: the true value is below the meter's range, whatever limit is stored: always severe
        (RangeFlag.LOW, 20, DEFAULT, ["hypo_severe"]),
        (RangeFlag.LOW, 60, DEFAULT, ["hypo_severe"]),
        (RangeFlag.LOW, 80, DEFAULT, ["hypo_severe"]),
        # HIGH: above the meter's range is hyper even where the limit is not above the threshold
        (RangeFlag.HIGH, 600, DEFAULT, ["hyper"]),
        (RangeFlag.HIGH, 250, DEFAULT, ["hyper"]),
        (RangeFlag.HIGH, 500, AlertsSection(hyper_mgdl=600), ["hyper"]),
    ],
)
def test_meter_high_low_flags(flag: RangeFlag, limit: int, limits: AlertsSection, expected: list[str]) -> None:
    assert codes(reading(limit, flag=flag, native=flag.value.upper()), limits) == expected


@pytest.mark.parametrize(
    ("mgdl", "flag"),
    [
        (10, RangeFlag.LOW),
        (40, RangeFlag.IN_RANGE),
        (53, RangeFlag.IN_RANGE),
        (60, RangeFlag.IN_RANGE),
        (251, RangeFlag.IN_RANGE),
        (600, RangeFlag.HIGH),
    ],
)
def test_control_solution_never_alerts(mgdl: int, flag: RangeFlag) -> None:
    assert codes(reading(mgdl, flag=flag, control=True)) == []
    assert codes(reading(mgdl, flag=flag, control=False)) != []


@pytest.mark.parametrize(
    ("mgdl", "expected"),
    [(59, ["hypo_severe"]), (60, ["hypo"]), (79, ["hypo"]), (80, []), (180, []), (181, ["hyper"])],
)
def test_configured_thresholds(mgdl: int, expected: list[str]) -> None:
    limits = AlertsSection(severe_hypo_mgdl=60, hypo_mgdl=80, hyper_mgdl=180)
    assert codes(reading(mgdl), limits) == expected


def test_at_most_one_alert_per_reading() -> None:
    for mgdl in range(0, 701):
        assert len(glucose_alerts(reading(mgdl), DEFAULT)) <= 1


@pytest.mark.parametrize(
    ("r", "fragments"),
    [
        (reading(53), ["53 mg/dL", "below 54", WHEN.isoformat()]),
        (reading(69), ["69 mg/dL", "below 70"]),
        (reading(251), ["251 mg/dL", "above 250"]),
        # a flagged result's stored value is only the meter's limit: the message must not present it as
        # the measured value
        (reading(20, flag=RangeFlag.LOW, native="LO"), ["LO", "below the meter's range (20 mg/dL)", "below 54"]),
        (reading(600, flag=RangeFlag.HIGH, native="HI"), ["HI", "above the meter's range (600 mg/dL)", "above 250"]),
    ],
)
def test_messages(r: GlucoseReading, fragments: list[str]) -> None:
    [(_code, message)] = glucose_alerts(r, DEFAULT)
    for fragment in fragments:
        assert fragment in message


def test_mmoll_message_keeps_the_meter_value() -> None:
    [(_code, message)] = glucose_alerts(reading(52, native="2.9", unit=Unit.MMOLL), DEFAULT)
    assert "52 mg/dL (2.9 mmol/L) below 54" in message
