"""Certificate renewal under mqtt.profile aws against the fake AWS IoT Core: the box calls fleet provisioning's
CreateCertificateFromCsr and RegisterThing again on a side connection with its current certificate
(agent/identity/aws_renewal.py), our pre-provisioning hook checks the proof signed with the thing's key and
names the same thing; the box tries the new pair, swaps it in and reconnects. Driven by the
``renew_certificate`` command (as a job) and by the renewal schedule (clock moved by testbed/clockshim.py);
SIGKILL mid-renewal leaves the old pair in use; every reading arrives once, verified."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from support.audit import assert_delivered_once, cert_of, kids_of, readings_of

from agent.identity.credentials import load_key
from agent.wire import cose
from backend.aws import pre_provisioning_hook
from backend.commands import sign_command, stored_result
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clockshim import build_clock_shim
from testbed.clouds.aws_fake import AwsSystem

DAY = 86_400


def log_of(state: Path) -> str:
    path = state / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


class Box:
    def __init__(self, system: AwsSystem, name: str, **agent: str) -> None:
        self.system = system
        self.state = system.device_dir(name)
        prov = system.provision(self.state, f"patient-{name}")
        assert prov.returncode == 0, prov.stdout + prov.stderr
        self.device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
        self.link = system.run / f"tty-{name}"
        self.records = system.run / f"{name}-meter.json"
        self.sim: Any = None
        self.config = system.config(
            self.state / "glucoagent.uci",
            [(str(self.link), "onetouch-ultra2")],
            agent={"reread_s": "10", "port_scan_s": "0.3", "health_interval_s": "3600", **agent},
            mqtt={"backoff_min_s": "0.1", "backoff_cap_s": "1"},
        )

    def meter(self, held: list[object]) -> None:
        self.records.write_text(dumps(held))  # type: ignore[arg-type]
        if self.sim is not None:
            os.killpg(self.sim.pid, signal.SIGKILL)
            self.sim.wait()
            self.system.procs.remove(self.sim)
        self.sim = self.system.start_simulator("onetouch-ultra2", self.link, self.records, "--baud", "0")


def test_renew_certificate_as_a_job_renews_through_fleet_provisioning(tmp_path: Path) -> None:
    with AwsSystem(tmp_path / "aws") as system:
        box = Box(system, "renew-job")
        first = cert_of(box.state)
        meter = random_records("onetouch-ultra2", 16, seed=191)  # newest first
        box.meter(meter[8:])
        system.start_agent(box.state, box.config)
        assert system.wait_for(lambda: len(readings_of(system.db, box.device_id)) >= 8, 60), log_of(box.state)[-3000:]

        cmd_id, envelope = sign_command(system.home.command_key, box.device_id, "renew_certificate")
        system.send_command_job(box.device_id, cmd_id, envelope)
        assert system.wait_for(lambda: stored_result(system.db, box.device_id, cmd_id) is not None, 60), log_of(
            box.state
        )[-3000:]
        result = stored_result(system.db, box.device_id, cmd_id)
        assert result is not None and result[:2] == ("ok", "renewed"), result
        second = cert_of(box.state)
        assert second.serial_number != first.serial_number
        assert second.subject == first.subject  # the same thing
        assert (box.state / "device.key").stat().st_mode & 0o777 == 0o600
        assert not (box.state / "renew").exists()
        assert system.db.counter("renewed") == 1  # the hook took the proof signed with the old key
        new_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        assert result[3]["kid"] == new_kid.hex()
        assert system.wait_for(lambda: "reconnecting with the new certificate" in log_of(box.state), 20)

        box.meter(meter)
        assert system.wait_for(lambda: len(readings_of(system.db, box.device_id)) >= 16, 60), log_of(box.state)[-3000:]
        assert_delivered_once(system.db, box.device_id, meter)
        assert new_kid in kids_of(system.db, box.device_id)
        assert len(kids_of(system.db, box.device_id)) == 2


def test_the_hook_refuses_a_renewal_not_signed_by_the_things_key(tmp_path: Path) -> None:
    """A proof signed with a key not registered for the thing: RegisterThing is refused, the box keeps its pair."""
    with AwsSystem(tmp_path / "aws") as system:
        box = Box(system, "renew-forged")
        from agent.config import Endpoint
        from agent.identity.aws_renewal import renew_on_aws
        from agent.identity.credentials import generate_key, load_identity
        from agent.identity.renewal import RenewalError
        from agent.link.routes import device_link_settings
        from agent.wire.aws import AwsProfile

        ident = load_identity(box.state)
        running = device_link_settings(AwsProfile(), ident, Endpoint.parse(ident.endpoint), protocol="mqttv5")
        first = cert_of(box.state)
        try:
            renew_on_aws(box.state, running, box.device_id, generate_key("p256"), "GlucoagentFleet")
        except RenewalError as exc:
            assert exc.code == "renewal_refused", exc
        else:
            raise AssertionError("a forged proof was accepted")
        assert cert_of(box.state).serial_number == first.serial_number
        assert not (box.state / "renew").exists()
        assert system.db.counter("renewed") == 0


def test_the_schedule_renews_and_a_sigkill_mid_renewal_keeps_the_old_pair(tmp_path: Path) -> None:
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    with AwsSystem(tmp_path / "aws") as system:
        box = Box(system, "renew-self", renew_before_days="30")
        first = cert_of(box.state)
        meter = random_records("onetouch-ultra2", 18, seed=192)  # newest first
        box.meter(meter[12:])
        agent = system.start_agent(box.state, box.config, env=env)
        assert system.wait_for(lambda: len(readings_of(system.db, box.device_id)) >= 6, 60), log_of(box.state)[-3000:]

        # (a) The hook (our Lambda) hangs: the box waits for RegisterThing with its key staged. SIGKILL now.
        gate = threading.Event()
        hook = system.aws.hook
        system.aws.hook = lambda event: (gate.wait(30), hook(event))[1]
        system.home.cert_days = 400
        offset.write_text(str(first.not_valid_after_utc.timestamp() - time.time() - 20 * DAY))  # 20 days left
        staged = box.state / "renew" / "device.key"
        assert system.wait_for(lambda: staged.exists() and "asking the cloud" in log_of(box.state), 60), log_of(
            box.state
        )[-3000:]
        box.meter(meter[6:])
        time.sleep(1)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        system.procs.remove(agent)
        gate.set()
        system.aws.hook = lambda event: pre_provisioning_hook(system.db, event)
        assert not (box.state / "renew" / "COMMIT").exists()
        assert cert_of(box.state).serial_number == first.serial_number

        offset.write_text("0")  # a year left by this clock: the old pair simply connects again
        mark = log_of(box.state).count("uplink: connected to")
        agent = system.start_agent(box.state, box.config, env=env)
        assert system.wait_for(lambda: log_of(box.state).count("uplink: connected to") > mark, 30), log_of(box.state)[-3000:]
        assert system.wait_for(lambda: len(readings_of(system.db, box.device_id)) >= 12, 60), log_of(box.state)[-3000:]
        assert not (box.state / "renew").exists()
        assert cert_of(box.state).serial_number == first.serial_number

        # (b) Due again, the hook answering: renewed, the link moves to the new pair, readings flow once.
        offset.write_text(str(first.not_valid_after_utc.timestamp() - time.time() - 20 * DAY))
        assert system.wait_for(lambda: cert_of(box.state).serial_number != first.serial_number, 90), log_of(
            box.state
        )[-3000:]
        assert system.wait_for(lambda: "certificate renewed: serial" in log_of(box.state), 30)
        assert cert_of(box.state).subject == first.subject
        box.meter(meter)
        assert system.wait_for(lambda: len(readings_of(system.db, box.device_id)) >= 18, 60), log_of(box.state)[-3000:]
        assert_delivered_once(system.db, box.device_id, meter)
        assert len(kids_of(system.db, box.device_id)) == 2


def test_a_thing_whose_certificate_expired_offline_renews_over_the_claim_connection(tmp_path: Path) -> None:
    with AwsSystem(tmp_path / "aws") as system:
        system.aws.cert_days = 25 / DAY  # AWS issues a certificate that expires 25 s after enrolment
        box = Box(system, "renew-expired")
        system.aws.cert_days = 365
        not_after = cert_of(box.state).not_valid_after_utc.timestamp()
        old_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        meter = random_records("onetouch-ultra2", 10, seed=193)
        assert system.wait_for(lambda: time.time() > not_after + 1, 40)
        box.meter(meter)
        system.start_agent(box.state, box.config)
        assert system.wait_for(lambda: len(readings_of(system.db, box.device_id)) >= 10, 120), log_of(box.state)[-4000:]
        assert "renewing over the claim connection" in log_of(box.state)
        assert "certificate recovered" in log_of(box.state)
        names = cert_of(box.state).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        assert [n.value for n in names] == [box.device_id]  # the same thing
        assert cert_of(box.state).not_valid_after_utc.timestamp() > time.time() + 300 * DAY
        assert_delivered_once(system.db, box.device_id, meter)
        assert kids_of(system.db, box.device_id) == {old_kid}
        assert system.db.counter("renewed") == 1
