"""Crash test: the agent is SIGKILLed at random moments during intake and upload.

Against the real broker and backend. Afterwards the backend must hold every
accepted reading exactly once, the clinical sequence numbers must have no gaps,
and the buffer must pass ``PRAGMA integrity_check`` after every single kill.
``GLUCOAGENT_CRASH_KILLS`` sets the number of kills: 200 in `make test`; `make soak` runs this test
again with 100 kills per soak minute (3 000 for the default 30 minutes). The loop itself is
tests/support/crash.py, shared with the cloud-profile variants (tests/system/test_aws_faults.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from support.crash import AGENT, MQTT, crash_loop

from testbed.harness import LocalSystem, device_config

KILLS = int(os.environ.get("GLUCOAGENT_CRASH_KILLS", "200"))


def test_sigkill_during_intake_and_upload_loses_and_doubles_nothing(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "crash") as system:
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        link = tmp_path / "ttyCRASH"
        config = device_config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")], agent=AGENT, mqtt=MQTT)
        seed = int(os.environ.get("GLUCOAGENT_CRASH_SEED", "4242"))
        assert crash_loop(system, state, config, link, KILLS, seed) >= KILLS
