"""`glucoagent-backend command --cloud aws`: the signed command goes as a job (CreateJob's arguments to the
bridge, which the fake plays), the box, offline when it was sent, runs it once when it comes back, and the CLI
returns the verified result as on the other clouds."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.wire import aws
from testbed.clouds.aws_fake import AwsSystem
from testbed.harness import BIN

BACKEND_CLI = str(BIN / "glucoagent-backend")


def test_command_cli_sends_a_job_and_waits_for_the_signed_result(tmp_path: Path) -> None:
    with AwsSystem(tmp_path / "aws") as system:
        state = system.device_dir("cli-box")
        prov = system.provision(state, "patient-cli")
        assert prov.returncode == 0, prov.stdout + prov.stderr
        device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
        config = system.config(state / "glucoagent.uci", [], mqtt={"backoff_min_s": "0.1", "backoff_cap_s": "1"})

        argv = [BACKEND_CLI, "command", device_id, "ping", "--cloud", "aws", "--home", str(system.home.root),
                "--port", str(system.broker.port), "--timeout", "60"]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert system.wait_for(lambda: bool(system.aws._jobs.get(device_id)), 20), "no job created"
        job = system.aws._jobs[device_id][0]
        assert job["status"] == aws.QUEUED  # the box is offline: the job waits (a session would expire in 1 h)
        time.sleep(1)

        system.start_agent(state, config)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err + (state / "agent.log").read_text()[-3000:]
        result = json.loads(out)
        assert (result["status"], result["code"], result["id"]) == ("ok", "pong", job["jobId"]), result
        assert system.wait_for(lambda: (system.aws.execution(device_id, job["jobId"]) or {}).get("status") == aws.SUCCEEDED, 20)
        log = (state / "agent.log").read_text()
        assert log.count(f"command {job['jobId']} (ping) started") == 1

        # The same command id again is refused by CreateJob (ResourceAlreadyExists): one job per command.
        with pytest.raises(ValueError, match="ResourceAlreadyExists"):
            system.aws.create_job(device_id, job["jobId"], {})
