"""When the box renews by itself (agent/identity/renewal.py RenewalSchedule): pure, no clock of its own."""

from __future__ import annotations

import pytest

from agent.config import SCHEMA, AgentSection
from agent.identity.renewal import RECOVER_RETRY_MAX_S, RETRY_MAX_S, RETRY_MIN_S, SETTLE_S, RenewalSchedule

DAY = 86_400.0
NOT_AFTER = 1_900_000_000.0


def schedule() -> RenewalSchedule:
    return RenewalSchedule(NOT_AFTER, 30 * DAY)


def test_nothing_before_the_margin_then_renew_while_connected() -> None:
    s = schedule()
    assert s.action(NOT_AFTER - 31 * DAY, 0.0, connected=True) is None
    assert s.action(NOT_AFTER - 29 * DAY, 0.0, connected=True) == "renew"
    assert s.action(NOT_AFTER - 29 * DAY, 0.0, connected=True) is None  # one attempt at a time


def test_due_but_not_expired_waits_for_the_link_expired_and_offline_recovers() -> None:
    s = schedule()
    assert s.action(NOT_AFTER - DAY, 0.0, connected=False) is None
    assert s.action(NOT_AFTER + 1, 0.0, connected=False) == "recover"


def test_failures_back_off_by_monotonic_time_doubling_to_a_cap() -> None:
    s = schedule()
    wall = NOT_AFTER - DAY
    delays = []
    mono = 0.0
    for _ in range(20):
        assert s.action(wall, mono, connected=True) == "renew"
        delays.append(s.failed(mono))
        assert s.action(wall, mono + delays[-1] - 0.1, connected=True) is None
        mono += delays[-1]
    assert delays[:3] == [RETRY_MIN_S, 2 * RETRY_MIN_S, 4 * RETRY_MIN_S]
    assert max(delays) == RETRY_MAX_S
    assert s.action(wall, mono, connected=True) == "renew"
    assert s.failed(mono, RECOVER_RETRY_MAX_S) == RECOVER_RETRY_MAX_S


def test_success_moves_the_deadline_and_a_certificate_due_at_once_waits_a_day() -> None:
    s = schedule()
    assert s.action(NOT_AFTER - DAY, 0.0, connected=True) == "renew"
    s.succeeded(NOT_AFTER + 365 * DAY, NOT_AFTER - DAY, 0.0)
    assert s.due_at == NOT_AFTER + 335 * DAY
    assert s.action(NOT_AFTER, 10.0, connected=True) is None
    # The cloud issued a certificate already inside the margin: no storm of renewals.
    assert s.action(NOT_AFTER + 340 * DAY, 20.0, connected=True) == "renew"
    s.succeeded(NOT_AFTER + 350 * DAY, NOT_AFTER + 340 * DAY, 20.0)
    assert s.action(NOT_AFTER + 340 * DAY, 20.0 + SETTLE_S - 1, connected=True) is None
    assert s.action(NOT_AFTER + 340 * DAY, 20.0 + SETTLE_S, connected=True) == "renew"


def test_the_margin_option_is_validated() -> None:
    assert AgentSection().renew_before_days == 30
    conv = SCHEMA["agent"]["renew_before_days"]
    assert conv("7") == 7
    for bad in ("0", "181", "x", "1.5"):
        with pytest.raises(ValueError):
            conv(bad)
