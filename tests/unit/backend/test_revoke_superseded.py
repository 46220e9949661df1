"""Which certificates a renewal's final result revokes (backend/commands.py), on a real SQLite file and CA."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from agent.identity.credentials import build_csr, generate_key
from agent.wire import cose
from backend.commands import key_in_good_standing, revoke_superseded
from backend.db import BackendDb
from backend.pki import FleetPki

DEVICE = "gd-0123456789ab"


@pytest.fixture
def world(tmp_path: Path) -> tuple[BackendDb, FleetPki]:
    db = BackendDb(tmp_path / "backend.db")
    with db.tx() as tx:
        tx.execute(
            "INSERT INTO devices (device_id, patient_ref, hardware_serial, created_at) VALUES (?, 'p', 'hw', 0)",
            (DEVICE,),
        )
    return db, FleetPki.create(tmp_path / "pki")


def register(db: BackendDb, pki: FleetPki, added_at: float, device: str = DEVICE) -> tuple[bytes, int]:
    """A certificate issued for a new key of ``device``, registered as the backend does; (kid, serial)."""
    key = generate_key("ed25519")
    pem = pki.sign_device_csr(build_csr(key, "hw"), device)
    kid = cose.key_id(key.public_key())
    with db.tx() as tx:
        tx.execute(
            "INSERT INTO device_keys (kid, device_id, cert_pem, added_at) VALUES (?, ?, ?, ?)", (kid, device, pem, added_at)
        )
    return kid, x509.load_pem_x509_certificate(pem).serial_number


def test_the_new_key_revokes_every_older_certificate_of_its_device_only(world: tuple[BackendDb, FleetPki]) -> None:
    db, pki = world
    _, first = register(db, pki, 1.0)
    _, unused = register(db, pki, 2.0)  # delivered for a renewal the box never finished
    kid, current = register(db, pki, 3.0)
    _, other_device = register(db, pki, 1.5, device="gd-ffffffffffff")
    revoked: list[int] = []
    assert revoke_superseded(db, DEVICE, kid, revoked.extend, frozenset()) == sorted([first, unused])
    assert sorted(revoked) == sorted([first, unused])
    assert current not in revoked and other_device not in revoked
    # Already revoked ones are not revoked again.
    assert revoke_superseded(db, DEVICE, kid, revoked.extend, frozenset(revoked)) == []


def test_a_late_result_of_an_earlier_renewal_never_revokes_a_newer_certificate(world: tuple[BackendDb, FleetPki]) -> None:
    db, pki = world
    _, first = register(db, pki, 1.0)
    middle_kid, _middle = register(db, pki, 2.0)
    _, newest = register(db, pki, 3.0)
    revoked: list[int] = []
    assert revoke_superseded(db, DEVICE, middle_kid, revoked.extend, frozenset()) == [first]
    assert newest not in revoked


def test_a_key_may_ask_for_a_certificate_only_while_enrolled_and_unrevoked(world: tuple[BackendDb, FleetPki]) -> None:
    db, pki = world
    kid, serial = register(db, pki, 1.0)
    assert key_in_good_standing(db, DEVICE, kid, frozenset()) is None
    assert "revoked" in str(key_in_good_standing(db, DEVICE, kid, frozenset({serial})))
    assert "no certificate" in str(key_in_good_standing(db, DEVICE, b"\0" * 16, frozenset()))
    with db.tx() as tx:
        tx.execute("DELETE FROM devices WHERE device_id = ?", (DEVICE,))
    assert "not enrolled" in str(key_in_good_standing(db, DEVICE, kid, frozenset()))
