"""What the cloud stored for a box, read back for the system tests' audits: the readings, that each was
stored once with a gap-free stream, and which device keys signed them (a renewal changes the key)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from agent.wire import cose
from backend.db import BackendDb


def readings_of(db: BackendDb, device_id: str) -> list[tuple[str, float]]:
    return [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in db.records(device_id, "reading")]


def expected(readings: list[object]) -> list[tuple[str, float]]:
    return sorted((m.meter_time.isoformat(), m.value_mgdl) for m in readings)  # type: ignore[attr-defined]


def assert_delivered_once(db: BackendDb, device_id: str, meter: list[object]) -> None:
    got = readings_of(db, device_id)
    assert sorted(got) == expected(meter), "every reading stored, none altered"
    assert len(got) == len(set(got)), "none stored twice"
    seqs = sorted(r.seq for r in db.records(device_id) if r.stream == "c")
    assert seqs == list(range(1, len(seqs) + 1))


def kids_of(db: BackendDb, device_id: str) -> set[bytes]:
    """The kids of the keys that signed the readings stored for ``device_id``."""
    rows = db.query("SELECT cose FROM records WHERE device_id = ? AND kind = 'reading'", (device_id,))
    out = set()
    for (raw,) in rows:
        _, prot, unprot, _, _ = cose.parse_sign1(raw)
        out.add(bytes(prot.get(cose.HDR_KID, unprot.get(cose.HDR_KID))))
    return out


def cert_of(state: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state / "device.crt").read_bytes())
