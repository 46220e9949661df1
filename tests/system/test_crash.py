"""Crash test: the agent is SIGKILLed at random moments during intake and upload.

Against the real broker and backend. Afterwards the backend must hold every
accepted reading exactly once, the clinical sequence numbers must have no gaps,
and the buffer must pass ``PRAGMA integrity_check`` after every single kill.
``GLUCOAGENT_CRASH_KILLS`` sets the number of kills: 200 in `make test`; `make soak` runs this test
again with 100 kills per soak minute (3 000 for the default 30 minutes).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.aws_fake import AwsSystem
from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import LocalSystem, device_config

KILLS = int(os.environ.get("GLUCOAGENT_CRASH_KILLS", "200"))
TOTAL = 240  # readings the meter ends up holding
AZURE_KILLS = 50
AWS_KILLS = 50


def integrity(db: Path) -> str:
    con = sqlite3.connect(db, timeout=5)  # also rolls back a hot journal left by the kill
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def test_sigkill_during_intake_and_upload_loses_and_doubles_nothing(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "crash") as system:
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        crash_and_audit(system, state, tmp_path, KILLS, {})


def test_sigkill_under_the_azure_profile(tmp_path: Path) -> None:
    """The same against the fake IoT Hub (mqtt.profile azure, cumulative C2D acks); 50 kills keep it short."""
    with AzureSystem(tmp_path / "crash-azure") as system:
        state = system.device_dir()
        system.enrol(state)
        crash_and_audit(system, state, tmp_path, min(KILLS, AZURE_KILLS), system.mqtt_options())
        assert system.responder.closed == []


def test_sigkill_under_the_aws_profile(tmp_path: Path) -> None:
    """The same against the fake AWS IoT Core (mqtt.profile aws, through its SNI gate); 50 kills keep it short."""
    with AwsSystem(tmp_path / "crash-aws") as system:
        state = system.device_dir()
        prov = system.provision(state)
        assert prov.returncode == 0, prov.stdout + prov.stderr
        crash_and_audit(system, state, tmp_path, min(KILLS, AWS_KILLS), {"profile": "aws"})


def crash_and_audit(system: LocalSystem, state: Path, tmp_path: Path, kill_count: int, mqtt: dict[str, str]) -> None:
    rng = random.Random(int(os.environ.get("GLUCOAGENT_CRASH_SEED", "4242")))
    everything = random_records("onetouch-ultra2", TOTAL, seed=99)  # newest first
    grow_every = max(1, kill_count // 12)  # the meter gains readings as the test goes on
    link = tmp_path / "ttyCRASH"
    config = device_config(
        state / "glucoagent.uci",
        [(str(link), "onetouch-ultra2")],
        agent={"port_scan_s": "0.2", "reread_s": "10", "health_interval_s": "3600"},
        mqtt={"batch_records": "7", "ack_timeout_s": "5", "backoff_min_s": "0.1", "backoff_cap_s": "1", **mqtt},
    )
    records_file = tmp_path / "meter.json"
    held = 0
    sim = None
    kills = 0
    while kills < kill_count:
        if kills % grow_every == 0 and held < TOTAL:
            held = min(TOTAL, held + max(1, TOTAL // 12))
            records_file.write_text(dumps(everything[-held:]))  # the oldest `held`, still newest first
            if sim is not None:
                os.killpg(sim.pid, signal.SIGKILL)
                sim.wait()
                system.procs.remove(sim)
            sim = system.start_simulator("onetouch-ultra2", link, records_file, "--baud", "0")
        agent = system.start_agent(state, config)
        time.sleep(rng.uniform(0.3, 1.6))  # start-up, meter read, signing, upload: somewhere in there
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        system.procs.remove(agent)
        kills += 1
        assert integrity(state / "buffer.db") == "ok", f"after kill {kills}"

    # Let a final agent finish the job undisturbed.
    records_file.write_text(dumps(everything))
    assert sim is not None
    os.killpg(sim.pid, signal.SIGKILL)
    sim.wait()
    system.procs.remove(sim)
    system.start_simulator("onetouch-ultra2", link, records_file, "--baud", "0")
    system.start_agent(state, config)
    readings = lambda: system.db.records(kind="reading")  # noqa: E731
    assert system.wait_for(lambda: len(readings()) >= TOTAL, timeout=120), (state / "agent.log").read_text()[-4000:]
    time.sleep(2)  # a late duplicate would show up now

    stored = readings()
    keys = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored]
    assert len(keys) == len(set(keys)), "a reading was stored twice"
    assert set(keys) == {(m.meter_time.isoformat(), m.value_mgdl) for m in everything}
    seqs = sorted(r.seq for r in system.db.records() if r.stream == "c")
    assert seqs == list(range(1, len(seqs) + 1)), "gap in the clinical sequence numbers"
    assert kills >= kill_count
