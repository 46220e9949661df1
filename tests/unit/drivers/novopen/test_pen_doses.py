"""Dose rules: validity, wall time, prime heuristic, insulin mapping, de-duplication key."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from drivers.novopen import doses
from drivers.novopen.pmstore import FLAGS_NORMAL_DOSE, DoseEntry, SegmentData, encode_float

READ_AT = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def entry(t: int, units: str, flags: int = FLAGS_NORMAL_DOSE) -> DoseEntry:
    return DoseEntry(t, encode_float(Decimal(units)), flags)


def report(*entries: DoseEntry, clock: int = 10_000) -> SegmentData:
    return SegmentData(clock, 16, 0, 0xC000, entries)


def test_wall_time_from_the_report_clock() -> None:
    items = doses.interpret([report(entry(9_000, "4.0"), clock=10_000)])
    (dose,) = doses.to_doses("PEN1", items, [READ_AT], {"PEN1": "Fiasp"})
    assert dose.dose_time == READ_AT - dt.timedelta(seconds=1_000)
    assert (dose.relative_time_s, dose.pen_clock_s, dose.read_at) == (9_000, 10_000, READ_AT)
    assert (dose.insulin, dose.units, dose.record_key) == ("Fiasp", Decimal("4.0"), "PEN1:9000:4")


def test_each_report_pairs_with_its_own_arrival_time() -> None:
    later = READ_AT + dt.timedelta(seconds=2)
    items = doses.interpret([report(entry(9_000, "4.0"), clock=10_000), report(entry(8_000, "3.0"), clock=10_002)])
    first, second = doses.to_doses("PEN1", items, [READ_AT, later])
    assert second.dose_time == later - dt.timedelta(seconds=2_002) == READ_AT - dt.timedelta(seconds=2_000)
    assert first.insulin is None  # pen not in the mapping


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (DoseEntry(100, 0x007FFFFF, FLAGS_NORMAL_DOSE), "NAN"),
        (DoseEntry(100, 0x00800000, FLAGS_NORMAL_DOSE), "NRES"),
        (DoseEntry(100, 0x007FFFFE, FLAGS_NORMAL_DOSE), "PLUS_INFINITY"),
        (entry(100, "0"), "outside"),
        (entry(100, "-2.0"), "outside"),
        (entry(100, "60.5"), "outside"),
        (entry(100, "2.0", 0x04000008), "flags"),
        (entry(20_000, "2.0"), "after the pen clock"),
    ],
)
def test_invalid_entries_are_rejected(bad: DoseEntry, reason: str) -> None:
    (item,) = doses.interpret([report(bad)])
    assert not item.valid and reason in (item.reason or "")
    assert doses.to_doses("PEN1", [item], [READ_AT]) == ()


def test_prime_heuristic() -> None:
    items = doses.interpret(
        [
            report(
                entry(5_000, "12.0"),  # real dose
                entry(4_990, "2.0"),  # prime: larger dose 10 s later
                entry(4_985, "1.0"),  # prime too: the 12 U is within 60 s
                entry(3_000, "2.0"),  # top-up: nothing larger follows within 60 s
                entry(2_950, "3.0"),
                entry(2_000, "2.0"),  # followed 61 s later: outside the window
                entry(1_939, "1.0"),  # followed by 2 U 61 s later... not within window either
                entry(1_000, "2.5"),  # above 2 U: never a prime
                entry(990, "20.0"),
            )
        ]
    )
    assert [i.prime for i in items] == [False, True, True, False, False, False, False, False, False]
    assert [i.prime for i in doses.interpret([report(entry(1_061, "8"), entry(1_000, "2"))])] == [False, False]
    assert [i.prime for i in doses.interpret([report(entry(1_060, "8"), entry(1_000, "2"))])] == [False, True]
    strict = doses.PrimeRule(max_units=Decimal(1), window_s=30)
    assert [i.prime for i in doses.interpret([report(entry(5_000, "12.0"), entry(4_990, "2.0"))], strict)] == [
        False,
        False,
    ]


def test_invalid_entries_do_not_make_primes() -> None:
    items = doses.interpret([report(DoseEntry(1_010, 0x007FFFFF, FLAGS_NORMAL_DOSE), entry(1_000, "2"))])
    assert [i.prime for i in items] == [False, False]


def test_dedupe_key_and_dedupe() -> None:
    assert doses.dose_key("P", 5, Decimal("2.0")) == doses.dose_key("P", 5, Decimal(2)) == "P:5:2"
    assert doses.dose_key("P", 5, Decimal("20")) == "P:5:20"
    assert doses.dose_key("P", 5, Decimal("0.5")) == "P:5:0.5"
    items = doses.interpret([report(entry(9_000, "4.0"), entry(8_000, "4.0"))])
    a = doses.to_doses("P", items, [READ_AT])
    b = doses.to_doses("P", items, [READ_AT + dt.timedelta(hours=1)])  # a later read of the same log
    seen: set[str] = set()
    assert doses.dedupe(a, seen) == list(a)
    assert doses.dedupe(b, seen) == []
