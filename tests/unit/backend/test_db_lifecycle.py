"""Backend database lifecycle on real SQLite files: range checks, bindings, migration, erase, retention."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from agent.wire import telemetry
from backend.db import BackendDb, patient_hmac
from backend.ingest import storable
from backend.retention import RetentionSweeper


def record(seq: int = 1, wall: float = 1.7e9, mono: float = 1.0, **fields: object) -> telemetry.Record:
    return telemetry.Record("gd-000000000001", seq, telemetry.Kind.READING, wall, "synced", b"\0" * 16, mono, fields)


@pytest.mark.parametrize(
    ("rec", "problem"),
    [
        (record(seq=2**63 - 1), None),
        (record(seq=2**63), "seq"),
        (record(seq=2**64), "seq"),
        (record(wall=float("inf")), "wall"),
        (record(wall=float("nan")), "wall"),
        (record(mono=float("-inf")), "mono"),
        (record(glu=float("nan")), "field"),
        (record(glu=10**30), None),  # JSON text holds it
    ],
)
def test_storable_checks_every_field_before_sql(rec: telemetry.Record, problem: str | None) -> None:
    fields, why = storable(rec)
    if problem is None:
        assert why is None and fields.startswith("{")
    else:
        assert why is not None and problem in why


def test_an_old_database_gets_bindings_without_rewriting_anything(tmp_path: Path) -> None:
    path = tmp_path / "backend.db"
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY, patient_ref TEXT NOT NULL, hardware_serial TEXT NOT NULL,"
        " created_at REAL NOT NULL, confirmed_at REAL, status TEXT, status_at REAL)"
    )
    con.execute(
        "CREATE TABLE records (device_id TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,"
        " received_at REAL NOT NULL, wall REAL NOT NULL, clock TEXT NOT NULL, fields TEXT NOT NULL,"
        " cose BLOB NOT NULL, PRIMARY KEY (device_id, stream, seq))"
    )
    con.execute("INSERT INTO devices VALUES ('gd-a', 'P1', 'hw', 100.0, NULL, NULL, NULL)")
    con.execute("INSERT INTO records VALUES ('gd-a', 'c', 1, 'reading', 200.0, 150.0, 'synced', '{}', x'00')")
    con.commit()
    con.close()

    db = BackendDb(path)
    try:
        assert db.query("SELECT device_id, patient_ref, valid_from, valid_to FROM bindings") == [
            ("gd-a", "P1", 100.0, None)
        ]
        assert db.patient_of_record("gd-a", "c", 1) == "P1"
    finally:
        db.close()
    BackendDb(path).close()  # opening again adds nothing
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM bindings").fetchone() == (1,)
    con.close()


def seeded(tmp_path: Path) -> BackendDb:
    db = BackendDb(tmp_path / "backend.db")
    now = time.time()
    with db.tx() as c:
        for dev, patient in (("gd-a", "P1"), ("gd-b", "P2")):
            c.execute(
                "INSERT INTO devices (device_id, patient_ref, hardware_serial, created_at) VALUES (?, ?, 'hw', ?)",
                (dev, patient, now),
            )
            c.execute("INSERT INTO bindings (device_id, patient_ref, valid_from) VALUES (?, ?, ?)", (dev, patient, now))
            for seq, age in ((1, 10 * 86_400), (2, 0)):
                c.execute(
                    "INSERT INTO records (device_id, stream, seq, kind, received_at, wall, clock, fields, cose, binding_id)"
                    " VALUES (?, 'c', ?, 'reading', ?, ?, 'synced', '{}', x'00', 1)",
                    (dev, seq, now - age, now - age),
                )
    return db


def test_erase_spares_other_patients_and_audits_without_the_reference(tmp_path: Path) -> None:
    db = seeded(tmp_path)
    try:
        db.add_token("TOKEN-P1", "P1", 60)
        deleted = db.erase_patient("P1", operator="ops", salt=b"salt")
        assert deleted == {"bindings": 1, "devices": 1, "records": 2, "tokens": 1}
        assert [r.device_id for r in db.records()] == ["gd-b", "gd-b"]
        audit = db.query("SELECT operator, patient_hmac, devices, rows FROM erasures")
        assert audit == [("ops", patient_hmac(b"salt", "P1"), 1, 5)]
        assert "P1" not in repr(db.query("SELECT * FROM erasures"))
        assert db.erase_patient("P1", operator="ops", salt=b"salt") == {}  # a second erase finds nothing, still audited
        assert len(db.query("SELECT * FROM erasures")) == 2
    finally:
        db.close()


def test_retention_sweeps_by_the_clouds_clock(tmp_path: Path) -> None:
    db = seeded(tmp_path)
    try:
        sweeper = RetentionSweeper(db, days=30, interval_s=60)
        assert sweeper.sweep() == {}
        assert RetentionSweeper(db, days=7, interval_s=60).sweep() == {"records": 2}
        assert sorted((r.device_id, r.seq) for r in db.records()) == [("gd-a", 2), ("gd-b", 2)]
        later = RetentionSweeper(db, days=7, interval_s=60, clock=lambda: time.time() + 8 * 86_400)
        assert later.sweep() == {"records": 2}
        assert db.records() == [] and db.counter("retention_deleted") == 4
    finally:
        db.close()


def test_retention_refuses_a_meaningless_period(tmp_path: Path) -> None:
    db = BackendDb(tmp_path / "backend.db")
    try:
        with pytest.raises(ValueError):
            RetentionSweeper(db, days=0, interval_s=60)
    finally:
        db.close()
