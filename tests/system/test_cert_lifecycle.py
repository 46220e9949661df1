"""Certificate lifecycle of a box, end to end with the real broker, backend, agent and CLI (docs/commands.md).

- renewal revokes the old certificate once the new one is in use: a TLS login with it is refused;
- the box renews by itself when its clock passes notAfter - agent.renew_before_days (the agent's
  wall clock moved by the LD_PRELOAD shim testbed/clockshim.py; libfaketime cannot run Python 3.11
  here), keeping its device id, readings flowing exactly once; SIGKILL before or after its swap
  leaves one working pair and the renewal completes;
- a box whose certificate expired while it was offline re-enrols over the claim path with proof of
  its old key: same device id and patient, its buffered readings (signed with the old key) delivered
  exactly once and verified;
- the backend refuses a re-enrolment not signed by the device's key, for a certificate still valid,
  or for a key whose certificate was revoked;
- a fleet run over 400 simulated days (broker, backend and box under one shifted clock):
  certificates renew, the CRL rolls over, every reading arrives once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from support.audit import assert_delivered_once, cert_of, kids_of, readings_of

from agent.errors import TlsError
from agent.fsutil import atomic_write
from agent.identity import renewal
from agent.identity.credentials import build_csr, generate_key, key_pem, load_key
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.wire import cose
from agent.wire import renewal as wire_renewal
from backend.broker import Broker
from backend.certs import CRL_DAYS
from backend.db import BackendDb
from backend.home import BackendHome
from backend.provisioning import new_token
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clockshim import build_clock_shim
from testbed.harness import BIN, GLUCOAGENT, LocalSystem, device_config, spawn, stop_process

PATIENT = "patient-lifecycle-7"
BACKEND_CLI = str(BIN / "glucoagent-backend")
DAY = 86_400


@dataclasses.dataclass
class Box:
    system: LocalSystem
    state: Path
    device_id: str
    link: Path
    records: Path
    config: Path | None = None
    sim: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        path = self.state / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cert(self) -> x509.Certificate:
        return cert_of(self.state)

    def meter(self, readings: list[object]) -> None:
        """The meter now holds ``readings`` (a restarted simulator, as a meter whose memory grew)."""
        self.records.write_text(dumps(readings))  # type: ignore[arg-type]
        if self.sim is not None:
            os.killpg(self.sim.pid, signal.SIGKILL)
            self.sim.wait()
            self.system.procs.remove(self.sim)
        self.sim = self.system.start_simulator("onetouch-ultra2", self.link, self.records, "--baud", "0")

    def readings(self) -> list[tuple[str, float]]:
        return readings_of(self.system.db, self.device_id)


def new_box(system: LocalSystem, name: str = "box") -> Box:
    state = system.device_dir(name)
    prov = system.provision(state, PATIENT)
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = json.loads((state / "device.json").read_text())["device_id"]
    return Box(system, state, device_id, system.run / f"tty-{name}", system.run / f"{name}-meter.json")


def configure(box: Box, **agent: str) -> Path:
    box.config = device_config(
        box.state / "glucoagent.uci",
        [(str(box.link), "onetouch-ultra2")],
        agent={"reread_s": "10", "port_scan_s": "0.3", **agent},
        mqtt={"backoff_min_s": "0.1", "backoff_cap_s": "1"},
    )
    return box.config


def assert_exactly_once(box: Box, meter: list[object]) -> None:
    assert_delivered_once(box.system.db, box.device_id, meter)


def login(state: Path, cert: Path, key: Path, client_id: str, port: int) -> None:
    """One TLS + MQTT login with the given pair (raises the agent's classified LinkError)."""
    link = MqttLink(LinkSettings("localhost", port, client_id, TlsFiles(state / "ca.crt", cert, key), clean_start=True))
    try:
        link.connect()
    finally:
        link.disconnect()


def kids_of_stored(box: Box) -> set[bytes]:
    return kids_of(box.system.db, box.device_id)


# --- 1. renewal revokes the old certificate ---------------------------------------------------------
def test_renewal_revokes_the_old_certificate_once_the_new_one_logged_in(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        box = new_box(system)
        old = tmp_path / "old"
        old.mkdir(mode=0o700)
        for name in ("device.crt", "device.key"):
            shutil.copy2(box.state / name, old / name)
        old_serial = box.cert().serial_number
        login(box.state, old / "device.crt", old / "device.key", box.device_id, system.broker.port)  # valid before
        meter = random_records("onetouch-ultra2", 14, seed=71)  # newest first
        box.meter(meter[6:])
        system.start_agent(box.state, configure(box))
        assert system.wait_for(lambda: len(box.readings()) >= 8, 60), box.log[-3000:]

        proc = subprocess.run(
            [BACKEND_CLI, "command", box.device_id, "renew_certificate", "--home", str(system.home.root),
             "--port", str(system.broker.port), "--timeout", "60"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        result = json.loads(proc.stdout)
        assert (result["status"], result["code"]) == ("ok", "renewed"), proc.stderr
        assert box.cert().serial_number != old_serial
        assert system.wait_for(lambda: old_serial in system.home.pki.revoked_serials(), 20), box.log[-3000:]

        def old_pair_refused() -> bool:  # the CRL is written before the broker has reloaded it
            try:
                login(box.state, old / "device.crt", old / "device.key", box.device_id, system.broker.port)
            except TlsError:
                return True
            return False

        assert system.wait_for(old_pair_refused, 20), box.log[-3000:]
        # The box moved its link to the new pair at once and goes on delivering.
        assert system.wait_for(lambda: "reconnecting with the new certificate" in box.log, 20), box.log[-3000:]
        box.meter(meter)
        assert system.wait_for(lambda: len(box.readings()) >= 14, 60), box.log[-3000:]
        assert_exactly_once(box, meter)
        new_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        assert new_kid in kids_of_stored(box)  # readings after the swap: new key; before: the old one, still verified
        assert len(kids_of_stored(box)) == 2
        assert system.db.counter("certificates_revoked") == 1


# --- 2. the box renews by itself ---------------------------------------------------------------------
def test_the_box_renews_by_itself_when_its_clock_passes_not_after_minus_the_margin(tmp_path: Path) -> None:
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    with LocalSystem(tmp_path / "sys") as system:
        box = new_box(system)
        first = box.cert()
        days_left = (first.not_valid_after_utc.timestamp() - time.time()) / DAY
        meter = random_records("onetouch-ultra2", 20, seed=72)  # newest first
        box.meter(meter[10:])
        system.start_agent(box.state, configure(box, renew_before_days="30"), env=env)
        assert system.wait_for(lambda: len(box.readings()) >= 10, 60), box.log[-3000:]
        assert "asking the cloud for a new one" not in box.log  # 365 days left: nothing to do

        # The box's clock moves to 20 days before notAfter (inside the 30-day margin). The cloud now
        # issues 400-day certificates, so the renewed one is not due again by this clock.
        system.home.cert_days = 400
        offset.write_text(str((days_left - 20) * DAY))
        assert system.wait_for(lambda: box.cert().serial_number != first.serial_number, 60), box.log[-3000:]
        assert "asking the cloud for a new one" in box.log
        assert system.wait_for(lambda: first.serial_number in system.home.pki.revoked_serials(), 30), box.log[-3000:]
        assert json.loads((box.state / "device.json").read_text())["device_id"] == box.device_id
        assert box.cert().subject == first.subject
        assert not (box.state / "renew").exists()

        box.meter(meter)  # readings keep flowing, now signed with the new key
        assert system.wait_for(lambda: len(box.readings()) >= 20, 60), box.log[-3000:]
        assert_exactly_once(box, meter)
        assert len(kids_of_stored(box)) == 2
        time.sleep(3)  # not due again: no renewal storm
        assert box.log.count("asking the cloud for a new one") == 1, box.log[-3000:]
        rows = system.db.query(
            "SELECT code FROM results WHERE device_id = ? AND command_id LIKE 'r%'", (box.device_id,)
        )
        assert [r[0] for r in rows] == ["renewed"]  # the request, then its final result signed with the new key


def test_a_renewal_the_box_started_survives_sigkill_before_and_after_its_swap(tmp_path: Path) -> None:
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    env = {**os.environ, "LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    with LocalSystem(tmp_path / "sys") as system:
        box = new_box(system)
        first = box.cert()
        meter = random_records("onetouch-ultra2", 12, seed=75)  # newest first
        box.meter(meter[6:])
        config = configure(box, renew_before_days="30")
        agent = system.start_agent(box.state, config, env=env)
        assert system.wait_for(lambda: len(box.readings()) >= 6, 60), box.log[-3000:]

        def kill() -> None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
            system.procs.remove(agent)

        # (a) Killed while it waits for its certificate (the cloud does not answer): the staged key is
        # dropped at the next start, the old pair stays in use, and the renewal is simply asked again.
        system.stop_backend()
        system.home.cert_days = 400
        offset.write_text(str(first.not_valid_after_utc.timestamp() - time.time() - 20 * DAY))  # 20 days left
        staged = box.state / "renew" / "device.key"
        assert system.wait_for(lambda: staged.exists() and "asking the cloud" in box.log, 30), box.log[-3000:]
        kill()
        assert not (box.state / "renew" / "COMMIT").exists()
        assert box.cert().serial_number == first.serial_number
        system.start_backend()
        agent = system.start_agent(box.state, config, env=env)
        assert system.wait_for(lambda: box.cert().serial_number != first.serial_number, 60), box.log[-3000:]
        assert system.wait_for(lambda: first.serial_number in system.home.pki.revoked_serials(), 30), box.log[-3000:]
        assert not (box.state / "renew").exists()

        # (b) Killed after the swap was committed, before its final result left: the files as such a
        # crash leaves them (a delivered certificate staged, COMMIT written, the renewal's mark with the
        # key in use before). The next start completes the swap and reports it, and the cloud revokes.
        kill()
        second = box.cert()
        old_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        key = generate_key("ed25519")
        cert_pem = system.home.pki.sign_device_csr(build_csr(key, "hw"), box.device_id, days=400)
        with system.db.tx() as tx:  # what the backend registered when it delivered that certificate
            tx.execute(
                "INSERT INTO device_keys (kid, device_id, cert_pem, added_at) VALUES (?, ?, ?, ?)",
                (cose.key_id(key.public_key()), box.device_id, cert_pem, time.time()),
            )
        atomic_write(box.state / "renew" / "device.key", key_pem(key))
        atomic_write(box.state / "renew" / "device.crt", cert_pem + system.home.pki.ca_pem)
        atomic_write(box.state / "renew" / "COMMIT", b"swap\n")
        rid = renewal.new_request_id()
        atomic_write(box.state / "commands" / "pending" / f"{rid}.selfrenew", old_kid.hex().encode())
        agent = system.start_agent(box.state, config, env=env)
        assert system.wait_for(lambda: second.serial_number in system.home.pki.revoked_serials(), 30), box.log[-3000:]
        assert box.cert().serial_number == x509.load_pem_x509_certificate(cert_pem).serial_number
        assert not (box.state / "renew").exists()
        assert f"renewal {rid} was swapped in before the agent stopped" in box.log
        box.meter(meter)
        assert system.wait_for(lambda: len(box.readings()) >= 12, 60), box.log[-3000:]
        assert_exactly_once(box, meter)
        assert json.loads((box.state / "device.json").read_text())["device_id"] == box.device_id


# --- 3. the way back after the certificate expired offline ----------------------------------------
def test_a_box_whose_certificate_expired_offline_comes_back_with_its_id_patient_and_readings(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        system.home.cert_days = 25 / DAY  # a certificate that expires 25 s after enrolment
        box = new_box(system)
        system.home.cert_days = 365
        not_after = box.cert().not_valid_after_utc.timestamp()
        old_kid = cose.key_id(load_key(box.state / "device.key").public_key())
        system.broker.stop()  # the box goes offline
        meter = random_records("onetouch-ultra2", 12, seed=73)
        box.meter(meter)
        config = configure(box)
        system.start_agent(box.state, config)

        def buffered() -> int:
            out = system.glucoagent(box.state, "status", "--json", config=config)
            return int(json.loads(out.stdout)["buffer_depth"]) if out.returncode == 0 else -1

        assert system.wait_for(lambda: buffered() >= 12, 40), box.log[-3000:]
        assert system.wait_for(lambda: time.time() > not_after + 1, 40)
        system.broker.start()  # back online months later: the broker refuses the expired certificate
        assert system.wait_for(lambda: len(box.readings()) >= 12, 90), box.log[-4000:]
        assert "re-enrolling over the claim path" in box.log
        assert json.loads((box.state / "device.json").read_text())["device_id"] == box.device_id
        assert box.cert().not_valid_after_utc.timestamp() > time.time() + 300 * DAY
        assert system.db.patient_of(box.device_id) == PATIENT
        assert_exactly_once(box, meter)
        assert kids_of_stored(box) == {old_kid}  # signed with the expired key, verified by its kid
        assert system.db.counter("recovered") == 1
        assert system.db.counter("rejected_records") == 0


def test_a_revoked_box_whose_certificate_expired_is_told_it_needs_a_technician(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        system.home.cert_days = 15 / DAY
        box = new_box(system)
        system.home.cert_days = 365
        system.home.revoke_certificates([box.cert().serial_number])  # withdrawn by the operator
        not_after = box.cert().not_valid_after_utc.timestamp()
        assert system.wait_for(lambda: time.time() > not_after + 1, 30)
        box.meter(random_records("onetouch-ultra2", 3, seed=76))
        system.start_agent(box.state, configure(box))
        assert system.wait_for(lambda: "it needs a technician" in box.log, 60), box.log[-3000:]
        assert "refused to re-enrol this box (not_recoverable)" in box.log
        assert "next certificate recover attempt in 10 s" in box.log
        time.sleep(3)
        assert box.log.count("re-enrolling over the claim path") == 1  # not hammering the cloud
        assert box.cert().not_valid_after_utc.timestamp() == not_after  # nothing swapped
        assert not (box.state / "renew").exists()
        assert system.db.counter("recovered") == 0


def test_the_backend_refuses_a_re_enrolment_without_proof_or_for_a_valid_or_revoked_certificate(
    tmp_path: Path,
) -> None:
    with LocalSystem(tmp_path / "sys") as system:
        box = new_box(system)
        service = system.service
        assert service is not None
        key = load_key(box.state / "device.key")
        csr = build_csr(generate_key("ed25519"), "hw")

        def ask(signing_key: object, device_id: str = box.device_id) -> dict[str, object]:
            rid = renewal.new_request_id()
            request = wire_renewal.encode_recovery_request(rid, device_id, signing_key, csr, time.time())  # type: ignore[arg-type]
            return service.provision(rid, request)

        other = ask(generate_key("ed25519"))
        assert (other["ok"], other["code"]) == (False, "bad_signature")
        valid = ask(key)
        assert (valid["ok"], valid["code"]) == (False, "not_expired")
        system.home.revoke_certificates([box.cert().serial_number])
        revoked = ask(key)
        assert (revoked["ok"], revoked["code"]) == (False, "not_recoverable")
        bad = service.provision("abcdefgh12", cbor2.dumps({"v": 1, "req": "abcdefgh12", "recover": b"junk"}))
        assert (bad["ok"], bad["code"]) == (False, "bad_signature")
        kid = cose.key_id(key.public_key())
        for body in (
            [1, 2],
            {"req": "abcdefgh12", "dev": box.device_id},
            {"req": "other-req-1", "dev": box.device_id, "csr": csr},
        ):
            signed = cose.sign1(key, cbor2.dumps(body), kid=kid)
            odd = service.provision("abcdefgh12", cbor2.dumps({"v": 1, "req": "abcdefgh12", "recover": signed}))
            assert (odd["ok"], odd["code"]) == (False, "bad_request"), body
        assert system.db.counter("recovered") == 0


# --- 4. a fleet run for 400 simulated days ----------------------------------------------------------
FLEET_DAYS = 400
STEP_DAYS = 5
CERT_DAYS = 60  # short certificates, so 400 days cover several renewals
MARGIN_DAYS = 20
GROW_EVERY_DAYS = 20  # the meter gains 4 readings every 20 simulated days
STEP_PAUSE_S = 0.5


@pytest.mark.slow
def test_a_fleet_runs_400_days_certificates_renew_the_crl_rolls_over_every_reading_once(tmp_path: Path) -> None:
    """Broker, backend (`glucoagent-backend serve` with its CRL keeper) and box each run under the
    wall-clock shim; one offset file moves their clocks together, 5 simulated days at a time. The box
    renews its 60-day certificate 20 days before expiry (about every 40 days), each renewal revokes the
    old certificate, the keeper re-issues the 30-day CRL daily, and the meter gains readings all along."""
    # Started as root, mosquitto drops to its own user: the offset file must be readable for it, and
    # pytest's tmp_path (0700 root) is not. A directory of its own in /tmp, world-readable, then.
    clock_dir = Path(tempfile.mkdtemp(prefix="glucoagent-clock-"))
    clock_dir.chmod(0o755)
    offset = clock_dir / "offset"
    offset.write_text("0")
    offset.chmod(0o644)
    shim = {"LD_PRELOAD": str(build_clock_shim(tmp_path)), "SOAK_CLOCK_OFFSET_FILE": str(offset)}
    env = {**os.environ, **shim}
    run = tmp_path / "fleet"
    home = BackendHome(run / "backend")
    home.ensure()
    broker = Broker(home.pki, home.broker_dir, env=shim)
    procs: list[subprocess.Popen[bytes]] = []
    broker.start()
    try:
        cloud = spawn(
            [BACKEND_CLI, "serve", "--home", str(home.root), "--port", str(broker.port), "--cert-days", str(CERT_DAYS),
             "--crl-check-interval", "0.3"],
            run / "backend.log", env,
        )  # fmt: skip
        procs.append(cloud)
        deadline = time.monotonic() + 30  # subscribed to the provisioning requests before the box asks
        while "backend: connected" not in (run / "backend.log").read_text():
            assert cloud.poll() is None and time.monotonic() < deadline, (run / "backend.log").read_text()
            time.sleep(0.1)
        db = BackendDb(home.root / "backend.db")
        token = new_token()
        db.add_token(token, PATIENT, 3600)
        state = run / "box"
        (state / "factory").mkdir(parents=True)
        for src, dst in (
            (home.pki.ca_path, "ca.crt"),
            (home.pki.claim.cert, "claim.crt"),
            (home.pki.claim.key, "claim.key"),
        ):
            shutil.copy(src, state / "factory" / dst)
        prov = subprocess.run(
            [GLUCOAGENT, "--state-dir", str(state), "provision", "--endpoint", broker.endpoint, f"--token={token}",
             f"--patient={PATIENT}"],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert prov.returncode == 0, prov.stdout + prov.stderr + (run / "backend.log").read_text()[-2000:]
        device_id = json.loads((state / "device.json").read_text())["device_id"]
        link, records = run / "tty-fleet", run / "meter.json"
        meter = random_records("onetouch-ultra2", 10 + FLEET_DAYS // STEP_DAYS, seed=74)  # newest first
        held = 10

        def start_meter() -> subprocess.Popen[bytes]:
            records.write_text(dumps(meter[len(meter) - held :]))
            sim = spawn([GLUCOAGENT, "simulate", "onetouch-ultra2", "--link", str(link), "--records", str(records),
                         "--baud", "0"], run / "simulator.log")  # fmt: skip
            deadline = time.monotonic() + 15
            while not link.exists():
                assert sim.poll() is None and time.monotonic() < deadline, (run / "simulator.log").read_text()
                time.sleep(0.05)
            return sim

        sim = start_meter()
        procs.append(sim)
        config = device_config(
            state / "glucoagent.uci", [(str(link), "onetouch-ultra2")],
            agent={"reread_s": "10", "port_scan_s": "0.3", "health_interval_s": "3600",
                   "renew_before_days": str(MARGIN_DAYS)},
            mqtt={"backoff_min_s": "0.1", "backoff_cap_s": "1"},
        )  # fmt: skip
        agent = spawn([GLUCOAGENT, "--state-dir", str(state), "--config", str(config), "run"], state / "agent.log", env)
        procs.append(agent)

        def stored() -> int:
            return len(readings_of(db, device_id))

        def fail(what: str) -> str:
            agent_log = (state / "agent.log").read_text(errors="replace")[-3000:]
            return f"{what}\nagent:\n{agent_log}\nbackend:\n{(run / 'backend.log').read_text()[-2000:]}"

        def wait(predicate: object, timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if predicate():  # type: ignore[operator]
                    return True
                time.sleep(0.1)
            return bool(predicate())  # type: ignore[operator]

        assert wait(lambda: stored() >= held, 60), fail("first readings")
        serials = [cert_of(state).serial_number]
        crl_numbers = set()
        for day in range(STEP_DAYS, FLEET_DAYS + 1, STEP_DAYS):
            offset.write_text(str(day * DAY))
            time.sleep(STEP_PAUSE_S)  # every shim has read the new offset (each re-reads it every 0.2 s)
            fake_now = time.time() + day * DAY
            if day % GROW_EVERY_DAYS == 0:  # the meter's memory grew (a restarted simulator, as in the soak)
                held += GROW_EVERY_DAYS // STEP_DAYS
                stop_process(sim)
                procs.remove(sim)
                sim = start_meter()
                procs.append(sim)
            if cert_of(state).not_valid_after_utc.timestamp() - MARGIN_DAYS * DAY <= fake_now:  # due, not renewed yet
                assert wait(lambda: cert_of(state).serial_number != serials[-1], 60), fail(f"no renewal at day {day}")
            if cert_of(state).serial_number != serials[-1]:
                serials.append(cert_of(state).serial_number)
            assert cert_of(state).not_valid_after_utc.timestamp() > fake_now, fail(f"certificate expired at day {day}")
            crl = x509.load_pem_x509_crl(home.pki.crl_pem())
            assert crl.next_update_utc.timestamp() > fake_now, f"the CRL lapsed at day {day}"
            crl_numbers.add(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
        assert wait(lambda: stored() >= held, 60), fail("not every reading arrived")

        # Every certificate before the current one was revoked once its successor was in use.
        assert len(serials) >= FLEET_DAYS // (CERT_DAYS - MARGIN_DAYS) - 1, serials
        assert wait(lambda: set(serials[:-1]) <= home.pki.revoked_serials(), 30), fail("old certificates not revoked")
        assert serials[-1] not in home.pki.revoked_serials()
        assert len(crl_numbers) > FLEET_DAYS // CRL_DAYS  # re-issued far more often than it would lapse
        assert json.loads((state / "device.json").read_text())["device_id"] == device_id
        assert db.patient_of(device_id) == PATIENT
        assert_delivered_once(db, device_id, meter[len(meter) - held :])
        assert (
            "re-enrolling over the claim path" not in (state / "agent.log").read_text()
        )  # renewed in time, never locked out
        assert db.counter("rejected_records") == 0
        # Readings flowed all along: the stored ones carry the signatures of several successive keys.
        assert len(kids_of(db, device_id)) >= 3
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        broker.stop()
        shutil.rmtree(clock_dir, ignore_errors=True)
