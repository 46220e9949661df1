"""The uplink's reconnect backoff (``agent.link.uplink._Attempts``): full jitter between ``lo / 2`` and
``min(cap, lo * 2^n)``, counting from the start again after ``reset``. tenacity, which computes it, is
imported at the first delay (docs/field.md): a box whose link stays up never loads it."""

from __future__ import annotations

import random

from agent.link.uplink import _Attempts


def test_delays_stay_within_full_jitter_bounds_and_reset() -> None:
    random.seed(17)
    attempts = _Attempts(1.0, 30.0)
    for n in range(1, 12):
        delay = attempts.next_delay()
        assert attempts.count == n
        assert 0.5 <= delay <= min(30.0, 2.0**n)
    attempts.reset()
    assert attempts.count == 0
    assert 0.5 <= attempts.next_delay() <= 2.0


def test_the_jitter_spreads_the_delays() -> None:
    attempts = _Attempts(1.0, 60.0)
    delays = set()
    for _ in range(50):
        attempts.reset()
        for _ in range(5):
            delay = attempts.next_delay()
        delays.add(round(delay, 3))
    assert len(delays) > 10  # not one fixed schedule that every box on a network would follow
