"""The reference cloud's own SQLite: devices, keys, enrolment tokens, received records. Every query the
cloud makes is a method here (the tables themselves are in ``backend/schema.py``).

Patient binding over time (docs/provisioning.md): ``bindings`` holds who a device
identity is bound to, from when to when; every stored record carries the binding
in force when it was stored, and that column is never rewritten. Deletion
(docs/security.md "Deletion"): ``erase_patient`` and ``purge_before``, with
``secure_delete`` so freed pages are zeroed and a WAL truncation after erasure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from backend.schema import MIGRATE_BINDINGS, OLD_RESULTS, SCHEMA

DB_FILE_MODE = 0o600
INT64_MAX = 2**63 - 1


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class StoredRecord:
    device_id: str
    stream: str
    seq: int
    kind: str
    received_at: float
    wall: float
    clock: str
    fields: dict[str, Any]


def jsonable(value: Any) -> Any:
    """A CBOR value as JSON for a TEXT column: Decimal -> float, a PEM byte string -> its text, other bytes -> hex."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("ascii") if value.startswith(b"-----BEGIN ") and value.isascii() else value.hex()
    return value


def restrict_db_files(path: Path) -> None:
    """The database and its WAL/SHM: owner only (they hold patient references and readings)."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, DB_FILE_MODE)


def patient_hmac(salt: bytes, patient_ref: str) -> str:
    return hmac.new(salt, patient_ref.encode(), hashlib.sha256).hexdigest()


class BackendDb:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: SQLite gives the WAL and SHM the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, DB_FILE_MODE))
        restrict_db_files(path)
        self.path = path
        # timeout = busy_timeout: ingest workers (backend/workers.py) are several writer processes on
        # this file; each waits up to 30 s for the write lock, and every transaction holds it briefly.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA secure_delete = ON")  # deleted rows are zeroed in their pages, not just unlinked
        self._lock = threading.RLock()
        self.lock_wait_s = 0.0  # time spent in BEGIN IMMEDIATE: waiting for SQLite's one write lock
        with self.tx() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
            if "body" in columns:
                db.execute(OLD_RESULTS)
            for stmt in SCHEMA:
                db.execute(stmt)
            if "binding_id" not in {row[1] for row in db.execute("PRAGMA table_info(records)")}:
                db.execute("ALTER TABLE records ADD COLUMN binding_id INTEGER")
                for stmt in MIGRATE_BINDINGS:  # once, when the column arrives: no scan at every start
                    db.execute(stmt)
        restrict_db_files(path)

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            t0 = time.perf_counter()
            self._db.execute("BEGIN IMMEDIATE")
            self.lock_wait_s += time.perf_counter() - t0
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # tokens ------------------------------------------------------------------------------
    @staticmethod
    def find_token(db: sqlite3.Connection, token: str) -> tuple[str, float, float | None, str | None] | None:
        """(patient, expires at, used at, used by device) of an enrolment token; None when unknown."""
        row = db.execute(
            "SELECT patient_ref, expires_at, used_at, device_id FROM tokens WHERE token_hash = ?", (token_hash(token),)
        ).fetchone()
        return (str(row[0]), float(row[1]), row[2], row[3]) if row else None

    @staticmethod
    def enrol_device(
        db: sqlite3.Connection, *, token: str, device_id: str, patient: str, hw_serial: str, kid: bytes,
        cert_pem: bytes, now: float,
    ) -> None:  # fmt: skip
        """Provisioning's writes, in the caller's transaction: the token spent, the device, its open
        binding (never re-pointed: the caller refused a different patient) and its key."""
        db.execute(
            "UPDATE tokens SET used_at = coalesce(used_at, ?), device_id = ? WHERE token_hash = ?",
            (now, device_id, token_hash(token)),
        )
        db.execute(
            "INSERT INTO devices (device_id, patient_ref, hardware_serial, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(device_id) DO NOTHING",
            (device_id, patient, hw_serial, now),
        )
        if BackendDb.open_binding(db, device_id) is None:
            db.execute(
                "INSERT INTO bindings (device_id, patient_ref, valid_from) VALUES (?, ?, ?)", (device_id, patient, now)
            )
        BackendDb.register_key(db, kid=kid, device_id=device_id, cert_pem=cert_pem, now=now)

    def add_token(self, token: str, patient_ref: str, ttl_s: float) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO tokens (token_hash, patient_ref, expires_at) VALUES (?, ?, ?)",
                (token_hash(token), patient_ref, time.time() + ttl_s),
            )

    def bump(self, name: str, by: int = 1) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    @staticmethod
    def count_in(db: sqlite3.Connection, name: str, by: int = 1) -> None:
        """``bump`` inside the caller's transaction."""
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counter(self, name: str) -> int:
        rows = self.query("SELECT value FROM counters WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    def records(self, device_id: str | None = None, kind: str | None = None) -> list[StoredRecord]:
        sql = "SELECT device_id, stream, seq, kind, received_at, wall, clock, fields FROM records WHERE 1=1"
        params: list[Any] = []
        if device_id:
            sql += " AND device_id = ?"
            params.append(device_id)
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY device_id, stream, seq"
        return [
            StoredRecord(d, s, q, k, r, w, c, json.loads(f))
            for d, s, q, k, r, w, c, f in self.query(sql, tuple(params))
        ]

    @staticmethod
    def insert_record(
        db: sqlite3.Connection, *, device_id: str, stream: str, seq: int, kind: str, received_at: float,
        wall: float, clock: str, fields: str, cose: bytes, binding_id: int,
    ) -> bool:  # fmt: skip
        """Store a verified record once per (device, stream, seq); False when it was already there.

        The primary key decides, inside the caller's BEGIN IMMEDIATE transaction: two ingest workers
        holding the same batch serialise on SQLite's write lock, and the second one's insert meets the
        first one's committed row. Only that key's conflict is ignored (any other constraint raises), so
        True or False both mean "this (device, stream, seq) is stored" once the transaction commits.
        """
        cur = db.execute(
            "INSERT INTO records "
            "(device_id, stream, seq, kind, received_at, wall, clock, fields, cose, binding_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, stream, seq) DO NOTHING",
            (device_id, stream, seq, kind, received_at, wall, clock, fields, cose, binding_id),
        )
        return bool(cur.rowcount)

    @staticmethod
    def quarantine_record(
        db: sqlite3.Connection, *, device_id: str, binding_id: int, stream: str, now: float, reason: str, raw: bytes
    ) -> None:
        """Keep a validly signed record the cloud cannot store as data, whole, and count it."""
        db.execute(
            "INSERT OR IGNORE INTO quarantine (digest, device_id, binding_id, stream, received_at, reason, cose) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (hashlib.sha256(raw).hexdigest(), device_id, binding_id, stream, now, reason, raw),
        )
        BackendDb.count_in(db, "rejected_records")

    # devices and their keys ------------------------------------------------------------------
    def is_enrolled(self, device_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)))

    def set_status(self, device_id: str, status: str, now: float) -> None:
        """The device's last will / birth message; the first "online" confirms the enrolment."""
        with self.tx() as db:
            db.execute("UPDATE devices SET status = ?, status_at = ? WHERE device_id = ?", (status, now, device_id))
            if status == "online":
                db.execute(
                    "UPDATE devices SET confirmed_at = coalesce(confirmed_at, ?) WHERE device_id = ?", (now, device_id)
                )

    def device_key(self, device_id: str, kid: bytes) -> tuple[bytes, float] | None:
        """The one device-key lookup: (certificate PEM, registered at) of key ``kid`` of ``device_id``."""
        rows = self.query(
            "SELECT cert_pem, added_at FROM device_keys WHERE kid = ? AND device_id = ?", (kid, device_id)
        )
        return (bytes(rows[0][0]), float(rows[0][1])) if rows else None

    def device_certs(self, device_id: str) -> list[bytes]:
        """PEMs of every certificate ever registered for the device (revoke takes them all)."""
        return [
            bytes(pem) for (pem,) in self.query("SELECT cert_pem FROM device_keys WHERE device_id = ?", (device_id,))
        ]

    def certs_registered_by(self, device_id: str, when: float, *, except_kid: bytes) -> list[bytes]:
        """PEMs of the device's other certificates registered at or before ``when`` (superseded by a renewal)."""
        rows = self.query(
            "SELECT cert_pem FROM device_keys WHERE device_id = ? AND kid != ? AND added_at <= ?",
            (device_id, except_kid, when),
        )
        return [bytes(pem) for (pem,) in rows]

    @staticmethod
    def register_key(db: sqlite3.Connection, *, kid: bytes, device_id: str, cert_pem: bytes, now: float) -> None:
        """A device key and its certificate, next to the device's older keys (readings signed with those
        still verify); the same key again only refreshes its certificate."""
        db.execute(
            "INSERT INTO device_keys (kid, device_id, cert_pem, added_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(kid) DO UPDATE SET cert_pem = excluded.cert_pem",
            (kid, device_id, cert_pem, now),
        )

    def add_key(self, *, kid: bytes, device_id: str, cert_pem: bytes, now: float) -> None:
        with self.tx() as db:
            self.register_key(db, kid=kid, device_id=device_id, cert_pem=cert_pem, now=now)

    # command results ----------------------------------------------------------------------------
    def record_command_sent(self, device_id: str, command_id: str, ctype: str, now: float) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO results (device_id, command_id, type, status, sent_at) "
                "VALUES (?, ?, ?, 'sent', ?)",
                (device_id, command_id, ctype, now),
            )

    def sent_command_type(self, device_id: str, command_id: str) -> str | None:
        rows = self.query("SELECT type FROM results WHERE device_id = ? AND command_id = ?", (device_id, command_id))
        return rows[0][0] if rows else None

    def store_final_result(
        self, *, device_id: str, command_id: str, status: str, code: str, message: str, data: str, cose: bytes,
        now: float,
    ) -> bool:  # fmt: skip
        """Keep the first final result per (device, command id); True when this one was stored."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO results (device_id, command_id, status, code, message, data, cose, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(device_id, command_id) DO UPDATE SET status = excluded.status, code = excluded.code, "
                "message = excluded.message, data = excluded.data, cose = excluded.cose, "
                "received_at = excluded.received_at WHERE results.status IN ('sent', 'pending')",
                (device_id, command_id, status, code, message, data, cose, now),
            )
            return cur.rowcount == 1

    def command_result(self, device_id: str, command_id: str) -> tuple[str, str, str, str | None] | None:
        """(status, code, message, data as JSON) of a command; None when nothing is known of it."""
        rows = self.query(
            "SELECT status, code, message, data FROM results WHERE device_id = ? AND command_id = ?",
            (device_id, command_id),
        )
        return (rows[0][0], rows[0][1], rows[0][2], rows[0][3]) if rows else None

    def patient_of(self, device_id: str) -> str | None:
        rows = self.query("SELECT patient_ref FROM devices WHERE device_id = ?", (device_id,))
        return rows[0][0] if rows else None

    # bindings -----------------------------------------------------------------------------
    @staticmethod
    def open_binding(db: sqlite3.Connection, device_id: str) -> tuple[int, str] | None:
        """(binding id, patient reference) in force for a device now; None when it has none."""
        row = db.execute(
            "SELECT id, patient_ref FROM bindings WHERE device_id = ? AND valid_to IS NULL "
            "ORDER BY valid_from DESC, id DESC LIMIT 1",
            (device_id,),
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def patient_of_record(self, device_id: str, stream: str, seq: int) -> str | None:
        """The patient a stored record is attributed to: its binding's, fixed when it was stored."""
        rows = self.query(
            "SELECT b.patient_ref FROM records r JOIN bindings b ON b.id = r.binding_id "
            "WHERE r.device_id = ? AND r.stream = ? AND r.seq = ?",
            (device_id, stream, seq),
        )
        return rows[0][0] if rows else None

    # deletion -----------------------------------------------------------------------------
    def erase_patient(self, patient_ref: str, *, operator: str, salt: bytes) -> dict[str, int]:
        """Delete every row of a patient in every table; leave an audit row without the reference.

        A patient's rows are those naming the reference (devices, tokens, bindings) and those of
        any device ever bound to it (records, quarantine, results, keys): a device identity is
        bound to one patient only, so nothing of another patient goes with it.
        """
        deleted: dict[str, int] = {}
        with self.tx() as db:
            devices = sorted(
                {r[0] for r in db.execute("SELECT device_id FROM bindings WHERE patient_ref = ?", (patient_ref,))}
                | {r[0] for r in db.execute("SELECT device_id FROM devices WHERE patient_ref = ?", (patient_ref,))}
                | {
                    r[0]
                    for r in db.execute(
                        "SELECT device_id FROM tokens WHERE patient_ref = ? AND device_id IS NOT NULL", (patient_ref,)
                    )
                }
            )
            marks = ",".join("?" * len(devices))
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                if table == "erasures":
                    continue
                columns = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
                where, params = [], []
                if "patient_ref" in columns:
                    where.append("patient_ref = ?")
                    params.append(patient_ref)
                if "device_id" in columns and devices:
                    where.append(f"device_id IN ({marks})")
                    params.extend(devices)
                if where:
                    n = db.execute(f'DELETE FROM "{table}" WHERE {" OR ".join(where)}', params).rowcount  # noqa: S608 - names from sqlite_master
                    if n:
                        deleted[table] = n
            db.execute(
                "INSERT INTO erasures (at, operator, patient_hmac, devices, rows, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    operator,
                    patient_hmac(salt, patient_ref),
                    len(devices),
                    sum(deleted.values()),
                    json.dumps(deleted, sort_keys=True),
                ),
            )
        self.checkpoint()
        return deleted

    def purge_before(self, cutoff: float) -> dict[str, int]:
        """Retention: delete received data stored before ``cutoff`` (the cloud's clock, not the box's)."""
        deleted: dict[str, int] = {}
        with self.tx() as db:
            for table, column in (
                ("records", "received_at"),
                ("quarantine", "received_at"),
                ("results", "received_at"),
            ):
                n = db.execute(f"DELETE FROM {table} WHERE {column} < ?", (cutoff,)).rowcount  # noqa: S608 - fixed names
                if n:
                    deleted[table] = n
            if deleted:
                db.execute(
                    "INSERT INTO counters (name, value) VALUES ('retention_deleted', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (sum(deleted.values()),),
                )
        if deleted:
            self.checkpoint()
        return deleted

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: deleted rows' old page images leave the WAL."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
