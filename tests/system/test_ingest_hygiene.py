"""Bad input at ingest and provisioning (issue 12, defects 5-7), against the real broker and backend.

- One validly signed record with an out-of-range field used to roll back its whole batch (nothing
  stored, acknowledged or counted; the box resends forever). Now it is rejected alone.
- A CSR for a key the CA cannot sign used to get no reply (the box timed out, exit 45).
- A message of any size used to be parsed.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from support import MqttProbe
from support.lifecycle import device_id_of, signed, upload

from agent.wire import topics
from backend.service import MAX_PAYLOAD
from testbed.harness import GLUCOAGENT, LocalSystem

PATIENT = "patient-ingest-0001"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("ingest")) as s:
        yield s


@pytest.fixture(scope="module")
def box(system: LocalSystem) -> Path:
    state = system.device_dir("box")
    device_id_of(system.provision(state, PATIENT))
    return state


def stored_seqs(system: LocalSystem, state: Path) -> list[int]:
    from agent.identity.credentials import load_identity

    return [r.seq for r in system.db.records(load_identity(state).device_id)]


# --- one poison record among good ones ---------------------------------------------------------------
def test_a_record_with_an_out_of_range_field_is_rejected_alone(system: LocalSystem, box: Path) -> None:
    rejected_before = system.db.counter("rejected_records")
    batch = [
        signed(box, 1),
        signed(box, 2**64),  # validly signed, but no SQLite integer holds it
        signed(box, 2),
        signed(box, 3, wall=float("inf")),  # in-range seq, a time that is no time
        signed(box, 4),
    ]

    ack = upload(system, box, batch)

    assert ack["c"] == [1, 2, 3, 4]  # 3 quarantined: the cloud holds it, so the box may let its row go
    assert ack["x"] == [2**64]  # names no row of any box's buffer, but says the cloud has it
    assert stored_seqs(system, box) == [1, 2, 4]
    assert system.db.counter("rejected_records") == rejected_before + 2
    reasons = sorted(r[0] for r in system.db.query("SELECT reason FROM quarantine"))
    assert len(reasons) == 2 and reasons[0].startswith("seq 18446744073709551616 out of range"), reasons
    assert "wall" in reasons[1]

    # The box resends (an ack lost): the same answer, nothing doubled.
    again = upload(system, box, batch)
    assert again == ack
    assert stored_seqs(system, box) == [1, 2, 4]
    assert system.db.query("SELECT count(*) FROM quarantine") == [(2,)]


# --- every key type a CSR can carry --------------------------------------------------------------------
def _key(kind: str) -> object:
    return {
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed448": ed448.Ed448PrivateKey.generate,
    }[kind]()


def _csr(key: object) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "probe")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "accepted"),
    [("ed25519", True), ("p256", True), ("p384", False), ("p521", False), ("rsa2048", False), ("ed448", False)],
)
def test_every_csr_key_type_gets_a_reply(system: LocalSystem, kind: str, accepted: bool) -> None:
    token = system.token(PATIENT)
    req = secrets.token_hex(12)
    probe = MqttProbe(system.home.pki.claim, system.broker.host, system.broker.port, client_id=f"claim-{req}")
    assert probe.connect()
    try:
        probe.subscribe(topics.provision_response(req))
        request = {"v": 1, "req": req, "csr": _csr(_key(kind)), "token": token, "patient": PATIENT, "hw": {}}
        probe.publish(topics.provision_request(req), cbor2.dumps(request))
        reply = cbor2.loads(probe.next_message_on(topics.provision_response(req), 15).payload)
    finally:
        probe.close()
    if accepted:
        assert reply["ok"] is True and reply["device_id"].startswith("gd-"), reply
    else:
        assert reply == {"ok": False, "code": "unsupported_key", "message": reply["message"]}
        assert "Ed25519 or EC P-256" in reply["message"]


def test_a_box_with_a_p384_key_gets_a_clear_refusal(system: LocalSystem) -> None:
    state = system.device_dir("p384")
    key = ec.generate_private_key(ec.SECP384R1())
    (state / "device.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (state / "device.key").chmod(0o600)
    argv = [
        GLUCOAGENT,
        "--state-dir",
        str(state),
        "provision",
        "--endpoint",
        system.broker.endpoint,
        f"--token={system.token(PATIENT)}",
        f"--patient={PATIENT}",
        "--timeout=15",
    ]

    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert out.returncode == 54, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glucoagent: error: enrolment refused (unsupported_key)"), lines
    assert "Traceback" not in out.stderr


# --- oversize input ----------------------------------------------------------------------------------
def test_an_oversize_message_is_refused_before_it_is_parsed(system: LocalSystem, box: Path) -> None:
    assert system.service is not None
    oversize_before = system.db.counter("oversize_messages")
    batches_before = system.db.counter("rejected_batches")
    # A small limit for the test, so the broker's own packet limit (whatever it is) lets the message through.
    limit = system.service.max_payload = 8192
    # A valid batch (one good record) padded past the limit: had it been parsed, the record would be stored.
    payload = cbor2.dumps([signed(box, 100), b"\0" * limit])
    assert len(payload) > limit

    try:
        with pytest.raises(TimeoutError):
            upload(system, box, [], payload=payload, timeout=3)
    finally:
        system.service.max_payload = MAX_PAYLOAD

    assert system.db.counter("oversize_messages") == oversize_before + 1
    assert system.db.counter("rejected_batches") == batches_before
    assert 100 not in stored_seqs(system, box)
    assert upload(system, box, [signed(box, 100)])["c"] == [100]  # the service goes on
