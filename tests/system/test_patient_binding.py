"""A box's patient binding changes only on purpose (issue 12, defect 3), against the real broker and backend.

Before: `glucoagent provision --token T2 --patient P2` on a box enrolled for P1 exited 0 with the
same device id and the backend re-pointed the device to P2, so P1's stored readings became P2's.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.lifecycle import device_id_of, signed, upload

from testbed.harness import GLUCOAGENT, LocalSystem

P1 = "patient-bind-0001"
P2 = "patient-bind-0002"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("binding")) as s:
        yield s


def provision(state: Path, endpoint: str, token: str, patient: str) -> subprocess.CompletedProcess[str]:
    argv = [
        GLUCOAGENT,
        "--state-dir",
        str(state),
        "provision",
        "--endpoint",
        endpoint,
        f"--token={token}",
        f"--patient={patient}",
        "--timeout=15",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def closed_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"mqtts://127.0.0.1:{s.getsockname()[1]}"


def enrolled_with_a_reading(system: LocalSystem, name: str) -> tuple[Path, str]:
    state = system.device_dir(name)
    device_id = device_id_of(system.provision(state, P1))
    assert upload(system, state, [signed(state, 1)])["c"] == [1]
    assert system.db.patient_of_record(device_id, "c", 1) == P1
    return state, device_id


def token_used(system: LocalSystem, token: str) -> bool:
    from backend.db import token_hash

    return system.db.query("SELECT used_at FROM tokens WHERE token_hash = ?", (token_hash(token),))[0][0] is not None


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glucoagent: error: "), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    return lines[0]


def test_the_box_refuses_another_patient_before_any_network(system: LocalSystem) -> None:
    state, device_id = enrolled_with_a_reading(system, "box-local")
    token2 = system.token(P2)

    # A closed port: had the box tried the network, it would exit 41 (broker unreachable).
    out = provision(state, closed_endpoint(), token2, P2)

    assert out.returncode == 53, out.stdout + out.stderr
    line = one_error_line(out)
    assert "enrolled for another patient" in line and "deprovision" in line and device_id in line
    assert P1 not in out.stdout + out.stderr  # the box keeps only a salted hash of its patient
    assert "[1/6] state directory" in out.stdout and "failed" in out.stdout
    # Same with the real endpoint: refused on the box, the cloud never asked, the token not spent.
    assert provision(state, system.broker.endpoint, token2, P2).returncode == 53
    assert not token_used(system, token2)
    assert system.db.patient_of(device_id) == P1
    assert system.db.patient_of_record(device_id, "c", 1) == P1
    assert P1.encode() not in b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())


def test_the_same_patient_again_is_still_a_safe_rerun(system: LocalSystem) -> None:
    state, device_id = enrolled_with_a_reading(system, "box-rerun")
    again = provision(state, system.broker.endpoint, system.token(P1), P1)
    assert device_id_of(again) == device_id
    assert system.db.query("SELECT patient_ref FROM bindings WHERE device_id = ?", (device_id,)) == [(P1,)]


def test_the_backend_refuses_a_box_that_asks_anyway(system: LocalSystem) -> None:
    state, device_id = enrolled_with_a_reading(system, "box-asks")
    (state / "binding.json").unlink()  # as a box enrolled by an agent from before the check would be
    token2 = system.token(P2)

    out = provision(state, system.broker.endpoint, token2, P2)

    assert out.returncode == 53, out.stdout + out.stderr
    assert "bound_to_other_patient" in one_error_line(out)
    assert system.db.patient_of(device_id) == P1
    assert system.db.query("SELECT patient_ref, valid_to FROM bindings WHERE device_id = ?", (device_id,)) == [
        (P1, None)
    ]
    assert not token_used(system, token2)
    assert system.db.patient_of_record(device_id, "c", 1) == P1
    # A reading uploaded after the refused attempt is still P1's.
    assert upload(system, state, [signed(state, 2)])["c"] == [2]
    assert system.db.patient_of_record(device_id, "c", 2) == P1


def test_after_deprovision_the_box_enrols_for_another_patient_and_old_readings_stay(system: LocalSystem) -> None:
    state, old_id = enrolled_with_a_reading(system, "box-moved")
    out = subprocess.run(
        [GLUCOAGENT, "--state-dir", str(state), "deprovision"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in state.iterdir()) == ["factory"]

    new_id = device_id_of(provision(state, system.broker.endpoint, system.token(P2), P2))

    assert new_id != old_id  # a new key, so a new identity: P1's signatures can never be P2's
    assert system.db.patient_of_record(old_id, "c", 1) == P1
    assert upload(system, state, [signed(state, 1)])["c"] == [1]
    assert system.db.patient_of_record(new_id, "c", 1) == P2
    assert system.db.patient_of(old_id) == P1


def test_a_refusal_changes_nothing_on_the_box(system: LocalSystem) -> None:
    state, _ = enrolled_with_a_reading(system, "box-files")
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    assert provision(state, system.broker.endpoint, system.token(P2), P2).returncode == 53
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before
