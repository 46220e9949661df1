"""``sync_time`` and ``reboot`` run the box's own program (``handlers._run_script``): its exit status and
output come back, and a program that outlives ``SCRIPT_TIMEOUT_S`` is one GlucoagentError, which the
executor reports as the command's failure. Real processes."""

from __future__ import annotations

import pytest

from agent.commands import handlers
from agent.errors import GlucoagentError


def test_a_program_runs_and_its_status_and_output_come_back() -> None:
    proc = handlers._run_script(["sh", "-c", "echo settime refused >&2; exit 3"])
    assert proc.returncode == 3
    assert handlers._tail(proc) == "settime refused"


def test_a_program_that_hangs_is_one_error_naming_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "SCRIPT_TIMEOUT_S", 0.3)
    with pytest.raises(GlucoagentError, match="timed out"):
        handlers._run_script(["sleep", "10"])
