"""Record sets for the simulators: random ones (tests, bench) and a small default demo set.

Every reading is built by the protocol codec's own ``make_reading`` so it is exactly what the
driver decodes from the simulator's bytes (the round-trip tests compare them with ``==``).
Records are newest first with distinct times, as meters store them.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from decimal import Decimal

from drivers.models import GlucoseReading

SERIALS = {
    "onetouch-ultra2": "HAXGR4PV",
    "contour-astm": "7410-1234567",
    "onetouch-ultraeasy": "C2X8ZB6FY",
}


def _times(rng: random.Random, count: int, newest: dt.datetime, seconds: bool) -> list[dt.datetime]:
    out = []
    when = newest.replace(microsecond=0) if seconds else newest.replace(second=0, microsecond=0)
    for _ in range(count):
        out.append(when)
        when -= dt.timedelta(minutes=rng.randint(1, 600), seconds=rng.randint(0, 59) if seconds else 0)
    return out


def _ultra2(rng: random.Random, when: dt.datetime, serial: str) -> GlucoseReading:
    from drivers import onetouch_ultra2 as c

    high = rng.random() < 0.05
    return c.make_reading(
        serial,
        when,
        c.HIGH_TEXT if high else f"{rng.randint(20, 600):03d}",
        control=rng.random() < 0.05,
        suspect=rng.random() < 0.03,
        meal=rng.choice(list(c.MEAL_LETTERS)),
        comment=rng.choice(list(c.COMMENT_NUMBERS)),
    )


def _contour(rng: random.Random, when: dt.datetime, serial: str) -> GlucoseReading:
    from drivers import contour_astm as c

    mmol = rng.random() < 0.3
    roll = rng.random()
    markers = [rng.choice(["", "B", "A", "F", "D"]), *rng.sample(["M0", "T1", "X", "Z"], rng.randint(0, 2))]
    if roll < 0.04:
        markers.append(c.MARK_HIGH)
        value = "33.3" if mmol else "600"
    elif roll < 0.08:
        markers.append(c.MARK_LOW)
        value = "0.6" if mmol else "10"
    elif mmol:
        value = str(Decimal(rng.randint(11, 333)) / 10)
    else:
        value = str(rng.randint(10, 600))
    if rng.random() < 0.05:
        markers.append(c.MARK_CONTROL)
    return c.make_reading(
        serial,
        when,
        value,
        "mmol/L" if mmol else "mg/dL",
        tuple(m for m in markers if m),
        c.DEFAULT_LIMITS,
    )


def _ultraeasy(rng: random.Random, when: dt.datetime, serial: str) -> GlucoseReading:
    from drivers import onetouch_ultraeasy as c

    roll = rng.random()
    raw = c.RAW_HIGH if roll < 0.04 else c.RAW_LOW if roll < 0.08 else rng.randint(20, 600)
    return c.make_reading(serial, when, raw)


GENERATORS: dict[str, tuple[Callable[[random.Random, dt.datetime, str], GlucoseReading], bool]] = {
    "onetouch-ultra2": (_ultra2, True),
    "contour-astm": (_contour, False),
    "onetouch-ultraeasy": (_ultraeasy, True),
}


def random_records(
    protocol: str,
    count: int,
    *,
    seed: int | None = None,
    serial: str | None = None,
    newest: dt.datetime | None = None,
) -> list[GlucoseReading]:
    """``count`` random readings for ``protocol``, newest first, distinct times."""
    make, seconds = GENERATORS[protocol]
    rng = random.Random(seed)
    serial = serial or SERIALS[protocol]
    start = newest or dt.datetime(2026, 3, 1, 8, 30, 15)
    return [make(rng, when, serial) for when in _times(rng, count, start, seconds)]


def demo_records(protocol: str) -> list[GlucoseReading]:
    """A small fixed set for ``glucoagent simulate`` without ``--records``."""
    return random_records(protocol, 12, seed=2026)


__all__ = ["SERIALS", "demo_records", "random_records"]
