"""The whole system under `mqtt.profile aws` against the fake AWS IoT Core (testbed/clouds/aws_fake.py): a fresh
box enrolled with one technician command, every reading once, a signed command sent as a job while the box
was offline and executed once, whatever is handed over again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.wire import aws, cose, telemetry
from backend.commands import sign_command, stored_result
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.aws_fake import AwsSystem

PATIENT = "patient-aws-e2e"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsSystem]:
    with AwsSystem(tmp_path_factory.mktemp("aws-e2e")) as s:
        yield s


def log_of(state: Path) -> str:
    return (state / "agent.log").read_text(errors="replace")


def start(system: AwsSystem, state: Path, config: Path) -> None:
    before = log_of(state).count("uplink: connected") if (state / "agent.log").exists() else 0
    system.start_agent(state, config)
    assert system.wait_for(lambda: log_of(state).count("uplink: connected") > before, 30), log_of(state)[-3000:]


def stop(system: AwsSystem, sig: signal.Signals = signal.SIGTERM) -> None:
    proc = system.procs.pop()
    os.killpg(proc.pid, sig)
    proc.wait(15)


def test_a_refused_token_is_one_line_and_exit_51(system: AwsSystem) -> None:
    state = system.device_dir("refused")
    out = system.provision(state, PATIENT, token="NOSUCHTOKEN23456")
    assert out.returncode == 51, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(
        "glucoagent: error: enrolment refused by the clinic's provisioning hook"
    )
    assert "[4/6]" in out.stdout.splitlines()[-1] and out.stdout.rstrip().endswith("failed")


def test_readings_arrive_once_verified_and_a_job_sent_offline_runs_once(system: AwsSystem) -> None:
    meter = random_records("onetouch-ultra2", 30, seed=23)
    records = system.run / "aws-meter.json"
    records.write_text(dumps(meter))
    link = system.run / "ttyAWS"
    system.start_simulator("onetouch-ultra2", link, records)
    state = system.device_dir("box")
    prov = system.provision(state, PATIENT)
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
    assert device_id.startswith("gd-")
    config = system.config(
        state / "glucoagent.uci", [(str(link), "auto")], mqtt={"backoff_min_s": "0.1", "backoff_cap_s": "1"}
    )
    start(system, state, config)
    assert system.wait_for(lambda: len(system.db.records(device_id=device_id, kind="reading")) >= 30, 60), log_of(
        state
    )[-3000:]
    clinical = sorted(r.seq for r in system.db.records(device_id=device_id) if r.stream == "c")
    assert clinical == list(range(1, len(clinical) + 1))  # gap-free, each once
    public_key = x509.load_pem_x509_certificate((state / "device.crt").read_bytes()).public_key()
    for (raw,) in system.db.query("SELECT cose FROM records WHERE device_id = ?", (device_id,)):
        verified = cose.verify1(raw, lambda kid: public_key if kid == cose.key_id(public_key) else None)
        assert telemetry.decode(verified.payload).device_id == device_id
    assert system.gate is not None and system.gate.refused_sni == []  # the agent named the endpoint in SNI
    # `glucoagent check` logs in beside the daemon on its own client id (<thing>-check), as the policy allows
    check = system.glucoagent(state, "check", config=config)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "MQTT login" in check.stdout

    # A command as a job while the box is offline.
    stop(system)
    cmd_id, envelope = sign_command(system.home.command_key, device_id, "ping")
    system.send_command_job(device_id, cmd_id, envelope)
    system.aws.drop_updates = 1  # its first execution update is lost: the box must not run it twice
    start(system, state, config)
    assert system.wait_for(lambda: stored_result(system.db, device_id, cmd_id) is not None, 30), log_of(state)[-3000:]
    assert (system.aws.execution(device_id, cmd_id) or {})["status"] == aws.IN_PROGRESS  # the update was lost
    stop(system, signal.SIGKILL)
    start(system, state, config)  # start-next hands the execution over again: a replay for the journal
    assert system.wait_for(
        lambda: (system.aws.execution(device_id, cmd_id) or {}).get("status") == aws.SUCCEEDED, 30
    ), log_of(state)[-3000:]
    assert (system.aws.execution(device_id, cmd_id) or {})["statusDetails"] == {"result": "ok"}
    log = log_of(state)
    assert log.count(f"command {cmd_id} (ping) started") == 1
    assert f"command {cmd_id} (ping) replayed" in log
    # a re-delivered notify-next and a restart change nothing
    system.aws._notify_next(device_id)
    stop(system)
    start(system, state, config)
    time.sleep(2)
    assert log_of(state).count(f"command {cmd_id} (ping) started") == 1
