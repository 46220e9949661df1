"""Certificate renewal under mqtt.profile azure (one connection per device): the box takes its link down,
registers again with DPS with a new key's CSR (agent/identity/dps.py ``renew_by_dps``), tries the new pair as
itself, swaps it in and reconnects. Driven by the ``renew_certificate`` command and by the renewal schedule
(the agent's clock moved by testbed/clockshim.py); SIGKILL mid-renewal leaves the old pair in use, and every
reading arrives once, verified, before and after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from cryptography import x509
from support.audit import assert_delivered_once, cert_of, kids_of, readings_of

from agent.identity.credentials import load_key
from agent.wire import cose
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clockshim import build_clock_shim
from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import BIN, device_config

BACKEND_CLI = str(BIN / "glucoagent-backend")
DAY = 86_400


class Box:
    def __init__(self, hub: AzureSystem, name: str, **agent: str) -> None:
        self.hub = hub
        self.state = hub.device_dir(name)  # the factory files: DPS is reached with the claim certificate
        self.device_id = hub.enrol(self.state)
        self.link = hub.run / f"tty-{name}"
        self.records = hub.run / f"{name}-meter.json"
        self.sim: subprocess.Popen[bytes] | None = None
        self.config = device_config(
            self.state / "glucoagent.uci",
            [(str(self.link), "onetouch-ultra2")],
            agent={"reread_s": "10", "port_scan_s": "0.3", "health_interval_s": "3600", **agent},
            mqtt=hub.mqtt_options(dps_host="localhost", backoff_min_s="0.1", backoff_cap_s="1"),
        )

    @property
    def log(self) -> str:
        path = self.state / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def meter(self, held: list[object]) -> None:
        self.records.write_text(dumps(held))  # type: ignore[arg-type]
        if self.sim is not None:
            os.killpg(self.sim.pid, signal.SIGKILL)
            self.sim.wait()
            self.hub.procs.remove(self.sim)
        self.sim = self.hub.start_simulator("onetouch-ultra2", self.link, self.records, "--baud", "0")


def test_renew_certificate_command_registers_again_with_dps_and_readings_flow_once(tmp_path: Path) -> None:
    with AzureSystem(tmp_path / "hub") as hub:
        box = Box(hub, "renew-cmd")
        first = cert_of(box.state)
        meter = random_records("onetouch-ultra2", 16, seed=181)  # newest first
        box.meter(meter[8:])
        hub.start_agent(box.state, box.config)
        assert hub.wait_for(lambda: len(readings_of(hub.db, box.device_id)) >= 8, 60), box.log[-3000:]

        argv = [BACKEND_CLI, "command", box.device_id, "renew_certificate", "--cloud", "azure", "--home",
                str(hub.home.root), "--port", str(hub.broker.port), "--timeout", "90"]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
        assert out.returncode == 0, out.stderr + box.log[-3000:]
        result = json.loads(out.stdout)
        assert (result["status"], result["code"]) == ("ok", "renewed"), result
        second = cert_of(box.state)
        assert second.serial_number != first.serial_number
        assert second.subject == first.subject  # same device id (the registration id)
        assert json.loads((box.state / "device.json").read_text())["device_id"] == box.device_id
        assert not (box.state / "renew").exists()
        assert "registering again with DPS" in box.log
        assert (box.state / "device.key").stat().st_mode & 0o777 == 0o600
        new_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        assert result["data"]["kid"] == new_kid.hex()

        box.meter(meter)  # readings after the swap: signed by the new key, delivered on the new certificate
        assert hub.wait_for(lambda: len(readings_of(hub.db, box.device_id)) >= 16, 60), box.log[-3000:]
        assert_delivered_once(hub.db, box.device_id, meter)
        assert new_kid in kids_of(hub.db, box.device_id)
        assert len(kids_of(hub.db, box.device_id)) == 2


def test_the_schedule_renews_through_dps_and_a_sigkill_mid_renewal_keeps_the_old_pair(tmp_path: Path) -> None:
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    with AzureSystem(tmp_path / "hub") as hub:
        box = Box(hub, "renew-self", renew_before_days="30")
        first = cert_of(box.state)
        meter = random_records("onetouch-ultra2", 18, seed=182)  # newest first
        box.meter(meter[12:])
        agent = hub.start_agent(box.state, box.config, env=env)
        assert hub.wait_for(lambda: len(readings_of(hub.db, box.device_id)) >= 6, 60), box.log[-3000:]
        assert "registering again with DPS" not in box.log  # a year left: nothing to do

        # (a) The allocation webhook is down (our backend stopped): the box's link is down, its staged key
        # waits in renew/, DPS says "assigning". SIGKILL now: the staged key is dropped at the next start and
        # the old pair logs in; nothing buffered is lost.
        hub.stop_backend()
        hub.home.cert_days = 400  # the renewed certificate is not due again by the moved clock
        offset.write_text(str(first.not_valid_after_utc.timestamp() - time.time() - 20 * DAY))  # 20 days left
        staged = box.state / "renew" / "device.key"
        assert hub.wait_for(lambda: staged.exists() and "registering again with DPS" in box.log, 60), box.log[-3000:]
        box.meter(meter[6:])  # readings taken while the link is held down stay in the buffer
        time.sleep(2)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        hub.procs.remove(agent)
        assert not (box.state / "renew" / "COMMIT").exists()
        assert cert_of(box.state).serial_number == first.serial_number

        hub.start_backend()
        offset.write_text("0")  # back to a clock with a year left: the old pair simply connects again
        mark = box.log.count("uplink: connected to")
        agent = hub.start_agent(box.state, box.config, env=env)
        assert hub.wait_for(lambda: box.log.count("uplink: connected to") > mark, 30), box.log[-3000:]
        assert not (box.state / "renew").exists()
        assert cert_of(box.state).serial_number == first.serial_number
        assert hub.wait_for(lambda: len(readings_of(hub.db, box.device_id)) >= 12, 60), box.log[-3000:]

        # (b) Due again, the webhook up: the schedule renews through DPS; the link comes back on the new pair.
        offset.write_text(str(first.not_valid_after_utc.timestamp() - time.time() - 20 * DAY))
        assert hub.wait_for(lambda: cert_of(box.state).serial_number != first.serial_number, 90), box.log[-3000:]
        assert hub.wait_for(lambda: box.log.count("certificate renewed: serial") == 1, 30), box.log[-3000:]
        assert cert_of(box.state).subject == first.subject
        assert not (box.state / "renew").exists()
        box.meter(meter)
        assert hub.wait_for(lambda: len(readings_of(hub.db, box.device_id)) >= 18, 60), box.log[-3000:]
        assert_delivered_once(hub.db, box.device_id, meter)
        assert len(kids_of(hub.db, box.device_id)) == 2
        rows = hub.db.query("SELECT code FROM results WHERE device_id = ? AND command_id LIKE 'r%'", (box.device_id,))
        assert [r[0] for r in rows] == ["renewed"]
        time.sleep(3)
        assert box.log.count("registering again with DPS") == 2, box.log[-3000:]  # the killed one, this one


def test_a_box_whose_certificate_expired_offline_registers_again_with_dps_and_delivers(tmp_path: Path) -> None:
    """Expired while offline, the hub refuses the certificate: the schedule's ``recover`` registers again with
    DPS (proof signed by the old key), same device id, the readings signed by the old key delivered once."""
    with AzureSystem(tmp_path / "hub") as hub:
        hub.home.cert_days = 25 / DAY  # a certificate that expires 25 s after enrolment
        box = Box(hub, "renew-expired")
        hub.home.cert_days = 365
        not_after = cert_of(box.state).not_valid_after_utc.timestamp()
        old_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        meter = random_records("onetouch-ultra2", 10, seed=183)
        assert hub.wait_for(lambda: time.time() > not_after + 1, 40)
        box.meter(meter)
        hub.start_agent(box.state, box.config)
        assert hub.wait_for(lambda: len(readings_of(hub.db, box.device_id)) >= 10, 120), box.log[-4000:]
        assert "registering again with DPS" in box.log and "certificate recovered" in box.log
        assert json.loads((box.state / "device.json").read_text())["device_id"] == box.device_id
        names = cert_of(box.state).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        assert [n.value for n in names] == [box.device_id]
        assert cert_of(box.state).not_valid_after_utc.timestamp() > time.time() + 300 * DAY
        assert_delivered_once(hub.db, box.device_id, meter)
        assert kids_of(hub.db, box.device_id) == {old_kid}  # signed before the renewal, verified by the old key's kid
        assert hub.db.counter("recovered") == 1
