"""`glucoagent provision` and `deprovision` as the technician runs them, against the real broker and backend.

The happy path starts from a fresh state directory (only the factory files), and
every failure the issue lists is provoked for real: a closed port, a name that
cannot resolve, a factory CA from another PKI, a clock in 2001 (libfaketime), a
refused token (unknown, used, expired), a backend that does not answer. Each must
end with its own exit code, one ``glucoagent: error:`` line, the failed step
marked, no traceback and no credentials written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from support import fill_buffer

from agent.errors import (
    BrokerUnreachable,
    ClockNotSet,
    ConfigError,
    DnsError,
    GlucoagentError,
    LinkTimeout,
    TlsError,
    TokenRejected,
)
from agent.identity.credentials import is_provisioned
from testbed.harness import GLUCOAGENT, LocalSystem
from testbed.rogue_ca import RogueCa

PATIENT = "patient-prov-4410"
STEPS = 6
SECRET_FILES = ("device.key", "device.crt", "ca.crt", "command.pub", "device.json", "binding.json", "release.pub")
FAKETIME = shutil.which("faketime")
# A token in the backend's alphabet that was never issued.
UNKNOWN_TOKEN = "ABCDEFGHJKLMNPQR"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("prov")) as s:
        yield s


def provision(
    system: LocalSystem,
    state: Path,
    token: str,
    *,
    endpoint: str | None = None,
    patient: str = PATIENT,
    timeout_s: float = 20,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    argv = [
        *prefix,
        GLUCOAGENT,
        "--state-dir",
        str(state),
        "provision",
        "--endpoint",
        endpoint or system.broker.endpoint,
        f"--token={token}",
        f"--patient={patient}",
        f"--timeout={timeout_s:g}",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 30, check=False)


def step_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("[")]


def assert_failed(
    out: subprocess.CompletedProcess[str], error: type[GlucoagentError], message: str, failed_step: int
) -> None:
    """Exit code of ``error``, one error line matching ``message``, steps ok up to ``failed_step``, no traceback."""
    both = out.stdout + out.stderr
    assert "Traceback" not in both, both
    assert out.returncode == error.exit_code, both
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith("glucoagent: error: "), errors[0]
    assert re.search(message, errors[0]), errors[0]
    steps = step_lines(out.stdout)
    assert len(steps) == failed_step, out.stdout
    for n, line in enumerate(steps, 1):
        assert line.startswith(f"[{n}/{STEPS}] ")
        assert line.endswith(" ... failed" if n == failed_step else " ... ok") or (
            n < failed_step and " ... ok (" in line
        ), line
    assert "provisioned: device id" not in out.stdout


def assert_nothing_written(state: Path) -> None:
    assert not is_provisioned(state)
    for name in SECRET_FILES[1:]:  # the key may exist (it is made before connecting, and reused)
        assert not (state / name).exists(), name


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return: nothing listens there


# --- the happy path -------------------------------------------------------------------------------
def test_provision_from_a_fresh_state_directory(system: LocalSystem) -> None:
    state = system.device_dir("fresh")
    assert sorted(p.name for p in state.iterdir()) == ["factory"]
    token = system.token(PATIENT)

    out = provision(system, state, token)

    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == ""
    steps = step_lines(out.stdout)
    assert [s.split("]")[0] + "]" for s in steps] == [f"[{n}/{STEPS}]" for n in range(1, STEPS + 1)]
    assert all(" ... ok" in s for s in steps), out.stdout
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"provisioned: device id (gd-[0-9a-f]{12})", last)
    assert m, last
    device_id = m[1]

    # Credentials: each file private to the agent, the directory too; nothing half-written left over.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in SECRET_FILES:
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    leftovers = [p.name for p in state.iterdir() if p.name not in (*SECRET_FILES, "factory")]
    assert leftovers == []
    meta = json.loads((state / "device.json").read_text())
    assert meta["device_id"] == device_id
    assert meta["endpoint"] == system.broker.endpoint
    assert meta["config"] == {"mqtt.keepalive": 30}
    cert = x509.load_pem_x509_certificate((state / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert (state / "ca.crt").read_bytes() == system.home.pki.ca_pem

    # The cloud bound the box to the patient, saw the confirmation, and never saw the private key.
    assert system.db.patient_of(device_id) == PATIENT
    assert system.db.query("SELECT confirmed_at FROM devices WHERE device_id = ?", (device_id,))[0][0]
    key_pem = (state / "device.key").read_bytes()
    assert b"PRIVATE KEY" in key_pem
    blob = b"".join(
        str(v).encode() if not isinstance(v, bytes) else v
        for row in system.db.query("SELECT * FROM device_keys") + system.db.query("SELECT * FROM devices")
        for v in row
    )
    assert key_pem.split(b"\n")[1] not in blob


def test_rerunning_provision_is_safe(system: LocalSystem) -> None:
    state = system.device_dir("rerun")
    token = system.token(PATIENT)
    first = provision(system, state, token)
    assert first.returncode == 0, first.stdout + first.stderr
    key = (state / "device.key").read_bytes()
    device_id = first.stdout.split()[-1]

    again = provision(system, state, token)  # same token, same box: re-confirmed, not refused

    assert again.returncode == 0, again.stdout + again.stderr
    assert "already provisioned: credentials kept" in again.stdout
    assert again.stdout.split()[-1] == device_id
    assert (state / "device.key").read_bytes() == key  # the key is never regenerated
    assert system.db.query("SELECT count(*) FROM devices WHERE device_id = ?", (device_id,)) == [(1,)]


# --- failures the technician can meet -----------------------------------------------------------
def test_broker_unreachable(system: LocalSystem) -> None:
    state = system.device_dir("closed-port")
    out = provision(system, state, system.token(PATIENT), endpoint=f"mqtts://localhost:{closed_port()}")
    assert_failed(out, BrokerUnreachable, r"broker localhost:\d+ refused the connection", 3)
    assert_nothing_written(state)


def test_dns_failure(system: LocalSystem) -> None:
    state = system.device_dir("dns")
    out = provision(system, state, system.token(PATIENT), endpoint="mqtts://nonexistent.invalid:8883")
    assert_failed(out, DnsError, r"cannot resolve nonexistent\.invalid", 3)
    assert_nothing_written(state)


def test_factory_ca_from_another_pki(system: LocalSystem, tmp_path: Path) -> None:
    """The box pins a CA that did not sign the broker (same subject name: only the signature differs)."""
    state = system.device_dir("wrong-ca")
    rogue = RogueCa(tmp_path / "rogue", system.home.pki, same_name=True)
    shutil.copy(rogue.ca_path, state / "factory" / "ca.crt")
    out = provision(system, state, system.token(PATIENT))
    assert_failed(out, TlsError, r"TLS: the broker at localhost:\d+ is not signed by the pinned fleet CA", 3)
    assert_nothing_written(state)


def test_claim_certificate_from_another_pki(system: LocalSystem, tmp_path: Path) -> None:
    """The broker refuses a claim certificate it did not issue; the box says its certificate was refused."""
    state = system.device_dir("rogue-claim")
    creds = RogueCa(tmp_path / "rogue", system.home.pki).issue_client_cert("claim")
    shutil.copy(creds.cert, state / "factory" / "claim.crt")
    shutil.copy(creds.key, state / "factory" / "claim.key")
    out = provision(system, state, system.token(PATIENT))
    assert_failed(out, TlsError, r"closed the connection during login \(device certificate refused", 3)
    assert_nothing_written(state)


def test_clock_before_the_certificates(system: LocalSystem) -> None:
    """A box that booted without a clock (2001): the broker's certificate is 'not yet valid'."""
    assert FAKETIME is not None, "libfaketime missing: `make setup` installs Debian's faketime"
    state = system.device_dir("clock")
    out = provision(system, state, system.token(PATIENT), prefix=(FAKETIME, "2001-01-01 00:00:00"))
    assert_failed(
        out, ClockNotSet, r"not yet valid by this box's clock \(2001-01-01 00:0\d UTC\): set the date and time", 3
    )
    assert_nothing_written(state)


def test_token_unknown(system: LocalSystem) -> None:
    state = system.device_dir("token-unknown")
    out = provision(system, state, UNKNOWN_TOKEN, timeout_s=5)
    assert_failed(out, TokenRejected, r"enrolment token refused \(token_unknown\)", 4)
    assert_nothing_written(state)


def test_token_already_used_by_another_box(system: LocalSystem) -> None:
    token = system.token(PATIENT)
    first = provision(system, system.device_dir("token-owner"), token)
    assert first.returncode == 0, first.stdout + first.stderr
    state = system.device_dir("token-thief")
    out = provision(system, state, token, timeout_s=5)
    assert_failed(out, TokenRejected, r"enrolment token refused \(token_used\)", 4)
    assert_nothing_written(state)


def test_token_expired(system: LocalSystem) -> None:
    state = system.device_dir("token-expired")
    out = provision(system, state, system.token(PATIENT, ttl_s=-60), timeout_s=5)
    assert_failed(out, TokenRejected, r"enrolment token refused \(token_expired\).*ask the clinic", 4)
    assert_nothing_written(state)


def test_provisioning_service_does_not_answer(system: LocalSystem) -> None:
    """Broker up, backend down: the request is published and nobody answers."""
    state = system.device_dir("timeout")
    token = system.token(PATIENT)
    system.stop_backend()
    try:
        out = provision(system, state, token, timeout_s=3)
    finally:
        system.start_backend()
    assert_failed(out, LinkTimeout, r"no answer from the provisioning service within 3s", 4)
    assert_nothing_written(state)
    # The token was never consumed: the same box succeeds once the backend is back.
    again = provision(system, state, token)
    assert again.returncode == 0, again.stdout + again.stderr


# --- deprovision ----------------------------------------------------------------------------------
def test_deprovision_refuses_while_readings_are_unsent(system: LocalSystem) -> None:
    state = system.device_dir("deprov")
    first = provision(system, state, system.token(PATIENT))
    assert first.returncode == 0, first.stdout + first.stderr
    seqs = fill_buffer(state, 12)
    assert len(seqs) >= 12

    refused = system.glucoagent(state, "deprovision")

    assert "Traceback" not in refused.stderr
    assert refused.returncode == GlucoagentError.exit_code, refused.stderr
    assert refused.stderr.strip() == (
        f"glucoagent: error: {len(seqs)} readings are not uploaded yet; refusing (use --force to wipe them)"
    )
    assert is_provisioned(state)
    assert (state / "buffer.db").exists()

    forced = system.glucoagent(state, "deprovision", "--force")

    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == f"deprovisioned: key, certificate and buffer wiped from {state}"
    assert sorted(p.name for p in state.iterdir()) == ["factory"]  # key, cert, buffer gone; claim kept
    assert sorted(p.name for p in (state / "factory").iterdir()) == ["ca.crt", "claim.crt", "claim.key"]

    # The box can be enrolled again from its factory files; it gets a new key, hence a new id.
    again = provision(system, state, system.token(PATIENT))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.split()[-1] != first.stdout.split()[-1]


def test_deprovision_without_unsent_readings_needs_no_force(system: LocalSystem) -> None:
    state = system.device_dir("deprov-empty")
    assert provision(system, state, system.token(PATIENT)).returncode == 0
    out = system.glucoagent(state, "deprovision")
    assert out.returncode == 0, out.stderr
    assert not is_provisioned(state)
    assert os.listdir(state) == ["factory"]


def test_unreadable_device_key_is_a_clear_error(system: LocalSystem) -> None:
    """A key file damaged on flash: one line naming the file and what to do, no traceback."""
    state = system.device_dir("garbled-key")
    (state / "device.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n")
    out = provision(system, state, system.token(PATIENT))
    assert_failed(out, ConfigError, r"device\.key: the device key is unreadable .*deprovision and enrol again", 2)
    assert_nothing_written(state)
