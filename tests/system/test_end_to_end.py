"""The walking skeleton through every layer, with real processes:

simulated OneTouch Ultra 2 on a pty -> driver -> CBOR + COSE_Sign1 with the device key
-> SQLite buffer -> MQTT over mutual TLS (real mosquitto, ACLs) -> backend verifies and
stores -> signed ack -> row leaves the buffer.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import SignatureError
from agent.wire import cose, telemetry
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config

PATIENT = "patient-e2e-7731"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("e2e")) as s:
        yield s


def status(system: LocalSystem, state: Path, config: Path) -> dict[str, object]:
    out = system.glucoagent(state, "status", "--json", config=config)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_readings_flow_from_meter_to_backend_verified_exactly_once(system: LocalSystem) -> None:
    meter = random_records("onetouch-ultra2", 30, seed=11)
    records = system.run / "ultra2-e2e.json"
    records.write_text(dumps(meter))
    link = system.run / "ttyE2E"
    system.start_simulator("onetouch-ultra2", link, records)
    state = system.device_dir("e2e-device")
    prov = system.provision(state, PATIENT)
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
    config = device_config(state / "glucoagent.uci", [(str(link), "auto")])
    agent = system.start_agent(state, config)

    def delivered() -> list[object]:
        return system.db.records(device_id=device_id, kind="reading")

    assert system.wait_for(lambda: len(delivered()) >= 30, timeout=60), (state / "agent.log").read_text()[-3000:]
    assert system.wait_for(lambda: status(system, state, config)["buffer_depth"] == 0, timeout=20)
    assert agent.poll() is None

    stored = system.db.records(device_id=device_id, kind="reading")
    assert len(stored) == 30
    clinical = sorted(r.seq for r in system.db.records(device_id=device_id) if r.stream == "c")
    assert clinical == list(range(1, len(clinical) + 1))  # readings and their alerts: gap-free, each once
    alerts = system.db.records(device_id=device_id, kind="alert")
    assert len(alerts) == sum(m.value_mgdl < 70 or m.value_mgdl > 250 for m in meter if not m.control_solution)
    got = {(r.fields["glu:meter_time"], r.fields["glu:mgdl"], r.fields["glu:meal"]) for r in stored}
    want = {(m.meter_time.isoformat(), m.value_mgdl, m.meal.value) for m in meter}
    assert got == want

    # Every stored record verifies against the device certificate, independently of the backend.
    cert_pem = (state / "device.crt").read_bytes()
    public_key = x509.load_pem_x509_certificate(cert_pem).public_key()
    raws = system.db.query("SELECT cose FROM records WHERE device_id = ?", (device_id,))
    for (raw,) in raws:
        verified = cose.verify1(raw, lambda kid: public_key if kid == cose.key_id(public_key) else None)
        rec = telemetry.decode(verified.payload)
        assert rec.device_id == device_id
        assert PATIENT.encode() not in raw  # no patient identity in telemetry
    assert system.db.patient_of(device_id) == PATIENT  # the binding lives in the cloud only


def test_status_reports_the_running_agent(system: LocalSystem) -> None:
    state = system.run / "e2e-device"
    config = state / "glucoagent.uci"
    st = status(system, state, config)
    assert st["provisioned"] is True
    assert st["connected"] is True
    assert st["meters"] and st["meters"][0]["protocol"] == "onetouch-ultra2"


def test_acks_are_signed_by_the_cloud(system: LocalSystem) -> None:
    from agent.wire.ack import decode_ack, encode_ack

    key = system.home.command_key
    good = encode_ack(key, "gd-abc", {"c": [1, 2]})
    assert decode_ack(good, key.public_key(), "gd-abc")["c"] == [1, 2]
    with pytest.raises(SignatureError):
        decode_ack(good, key.public_key(), "gd-other")
    forged = cose.sign1(ed25519.Ed25519PrivateKey.generate(), cbor2.dumps({"dev": "gd-abc", "c": [1]}))
    with pytest.raises(SignatureError):
        decode_ack(forged, key.public_key(), "gd-abc")


def test_deprovision_refuses_while_the_agent_runs(system: LocalSystem) -> None:
    state = system.run / "e2e-device"
    out = system.glucoagent(state, "deprovision", "--force", config=state / "glucoagent.uci")
    assert out.returncode == 1
    assert out.stderr.strip() == "glucoagent: error: the agent is running: stop it first (/etc/init.d/glucoagent stop)"
    assert (state / "device.key").exists()


def test_es256_device_key_end_to_end(system: LocalSystem) -> None:
    """agent.key_type p256: the device signs ES256 (alg -7), the backend verifies, nothing else changes."""
    meter = random_records("onetouch-ultra2", 8, seed=13)
    records = system.run / "ultra2-es256.json"
    records.write_text(dumps(meter))
    link = system.run / "ttyES256"
    system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
    state = system.device_dir("es256-device")
    token = system.token(PATIENT)
    prov = system.glucoagent(
        state, "provision", f"--endpoint={system.broker.endpoint}", f"--token={token}", f"--patient={PATIENT}",
        "--key-type=p256",
    )
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
    system.start_agent(state, device_config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")]))
    assert system.wait_for(lambda: len(system.db.records(device_id=device_id, kind="reading")) >= 8, timeout=60)
    raws = system.db.query("SELECT cose FROM records WHERE device_id = ?", (device_id,))
    algs = {cose.parse_sign1(raw)[1][cose.HDR_ALG] for (raw,) in raws}
    assert algs == {cose.ALG_ES256}


def test_check_passes_on_a_working_box_and_names_what_fails(system: LocalSystem, tmp_path: Path) -> None:
    state = system.run / "e2e-device"
    out = system.glucoagent(state, "check", config=state / "glucoagent.uci")
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("ok     clock:", "ok     serial port meter1:", "ok     broker reachable:", "ok     TLS handshake:",
                 "ok     MQTT login: as gd-"):
        assert line in out.stdout, out.stdout
    # The same box pointed at a port where nothing listens: the broker check fails with its own code.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    bad = device_config(tmp_path / "bad.uci", [], mqtt={"endpoint": f"mqtts://localhost:{closed}"})
    out = system.glucoagent(state, "check", config=bad)
    assert out.returncode == 41, out.stdout + out.stderr
    assert "FAILED broker: broker localhost:" in out.stdout and "refused the connection" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
