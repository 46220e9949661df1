"""Dose records from a pen's segment data: validity, wall time, prime heuristic, insulin, dedupe key.

Pure functions: no port, no clock (the caller passes the wall-clock instants).

**Time rule.** The pen has only a relative clock (seconds since it was made). Every
segment-data report carries the pen clock at the moment the pen sent it; the
agent notes its own UTC clock when that report arrives. An entry's wall time is

    received_at - (report_time - entry.relative_time)

(``InsulinDose.dose_time`` with ``pen_clock_s = report_time``, ``read_at = received_at``),
exactly the rule of nov-open-reader and xDrip. Both raw values are kept in the record so
the cloud can recompute when the box's clock turns out wrong.

**Validity.** An entry is a dose only when its FLOAT is an ordinary number in
(0, 60] U (NovoPen 6 dials 1-60 U, Echo Plus 0.5-30 U; NaN, NRes, ±INF and reserved
values are rejected), its flags are ``0x08000000`` (the only value XD and NVP accept;
the invalid vector carries ``0x04000008`` with a NaN dose), and its time is not after
the pen clock of its report.

**Prime (air shot) heuristic.** The pen does not flag primes. A dose is marked
``prime`` when it is at most ``PrimeRule.max_units`` (2 U) and a *larger* dose from the
same pen follows it within ``PrimeRule.window_s`` (60 s) of pen time: the patient dials
a small safety shot, then the real dose. xDrip uses the same shape (configurable
units/minutes); nov-open-reader groups doses under 60 s apart and drops leading doses
<= 2 U. A small dose with nothing larger after it (a top-up, a child's dose) stays a
dose. Known limit: a prime given less than ``window_s`` before a read has no
successor yet and is stored as a dose; the raw log lets the cloud re-evaluate.

**De-duplication key.** ``"{serial}:{relative_time}:{units}"`` (units normalised, so
``2.0`` and ``2`` agree), the same triple xDrip uses; stable across reads, so a read cut
short and the next full read store every dose exactly once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

from drivers.models import InsulinDose
from drivers.novopen.pmstore import FLAGS_NORMAL_DOSE, DoseEntry, FloatSpecial, SegmentData, decode_float

__all__ = [
    "MAX_UNITS",
    "Interpreted",
    "PrimeRule",
    "dedupe",
    "dose_key",
    "interpret",
    "mark_primes",
    "to_doses",
]

#: Largest dose a NovoPen 6 can deliver in one injection.
MAX_UNITS = Decimal(60)
MIN_UNITS = Decimal(0)


@dataclasses.dataclass(frozen=True, slots=True)
class PrimeRule:
    max_units: Decimal = Decimal(2)
    window_s: int = 60

    def __post_init__(self) -> None:
        if self.max_units < 0 or self.window_s < 0:
            raise ValueError(f"prime rule needs max_units >= 0 and window_s >= 0, got {self}")


DEFAULT_PRIME_RULE = PrimeRule()


@dataclasses.dataclass(frozen=True, slots=True)
class Interpreted:
    """One pen entry, judged: ``units`` is None and ``reason`` says why when it is not a dose."""

    entry: DoseEntry
    report_index: int  # which report (in arrival order) carried it
    report_time: int  # pen clock of that report
    units: Decimal | None
    reason: str | None
    prime: bool = False

    @property
    def valid(self) -> bool:
        return self.reason is None

    @property
    def seconds_before_report(self) -> int:
        return self.report_time - self.entry.relative_time


def normalise_units(units: Decimal) -> str:
    text = format(units.normalize(), "f")
    return text


def dose_key(serial: str, relative_time: int, units: Decimal) -> str:
    return f"{serial}:{relative_time}:{normalise_units(units)}"


def judge(entry: DoseEntry, report_time: int) -> tuple[Decimal | None, str | None]:
    value = decode_float(entry.units_raw)
    if isinstance(value, FloatSpecial):
        return None, f"units {value.name} (0x{entry.units_raw:08X})"
    if not MIN_UNITS < value <= MAX_UNITS:
        return None, f"units {value} outside (0, {MAX_UNITS}]"
    if entry.flags != FLAGS_NORMAL_DOSE:
        return None, f"flags 0x{entry.flags:08X} are not a normal dose"
    if entry.relative_time > report_time:
        return None, f"entry time {entry.relative_time} s is after the pen clock {report_time} s"
    return value, None


def mark_primes(items: Sequence[Interpreted], rule: PrimeRule = DEFAULT_PRIME_RULE) -> list[Interpreted]:
    """Set ``prime`` on the valid entries that the heuristic calls air shots (order preserved)."""
    valid = [(i, it) for i, it in enumerate(items) if it.units is not None]
    by_time = sorted(valid, key=lambda p: p[1].entry.relative_time)
    primes: set[int] = set()
    for pos, (index, item) in enumerate(by_time):
        units = item.units
        if units is None or units > rule.max_units:
            continue
        start = item.entry.relative_time
        for _, later in by_time[pos + 1 :]:
            if later.entry.relative_time - start > rule.window_s:
                break
            if later.entry.relative_time > start and later.units is not None and later.units > units:
                primes.add(index)
                break
    return [dataclasses.replace(it, prime=i in primes) for i, it in enumerate(items)]


def interpret(reports: Sequence[SegmentData], rule: PrimeRule = DEFAULT_PRIME_RULE) -> list[Interpreted]:
    """Every entry of every report, in pen order (newest first), judged and prime-marked."""
    items = []
    for index, report in enumerate(reports):
        for entry in report.entries:
            units, reason = judge(entry, report.report_time)
            items.append(Interpreted(entry, index, report.report_time, units, reason))
    return mark_primes(items, rule)


def to_doses(
    serial: str,
    items: Sequence[Interpreted],
    received_at: Sequence[dt.datetime],
    insulin: Mapping[str, str] | None = None,
) -> tuple[InsulinDose, ...]:
    """``InsulinDose`` records for the valid entries; ``received_at[i]`` is when report i arrived (UTC)."""
    kind = (insulin or {}).get(serial)
    doses = []
    for item in items:
        if item.units is None:
            continue
        doses.append(
            InsulinDose(
                pen_serial=serial,
                record_key=dose_key(serial, item.entry.relative_time, item.units),
                relative_time_s=item.entry.relative_time,
                pen_clock_s=item.report_time,
                read_at=received_at[item.report_index],
                units=item.units,
                flags=item.entry.flags,
                prime=item.prime,
                insulin=kind,
            )
        )
    return tuple(doses)


def dedupe(doses: Iterable[InsulinDose], seen: set[str] | None = None) -> list[InsulinDose]:
    """Doses whose key is not in ``seen`` (updated in place), first occurrence wins."""
    seen = set() if seen is None else seen
    fresh = []
    for dose in doses:
        if dose.record_key not in seen:
            seen.add(dose.record_key)
            fresh.append(dose)
    return fresh
