"""The reference cloud's own SQLite: devices, keys, enrolment tokens, received records."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY, patient_ref TEXT NOT NULL, hardware_serial TEXT NOT NULL,
        created_at REAL NOT NULL, confirmed_at REAL, status TEXT, status_at REAL)""",
    """CREATE TABLE IF NOT EXISTS device_keys (
        kid BLOB PRIMARY KEY, device_id TEXT NOT NULL, cert_pem BLOB NOT NULL, added_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tokens (
        token_hash TEXT PRIMARY KEY, patient_ref TEXT NOT NULL, expires_at REAL NOT NULL,
        used_at REAL, device_id TEXT)""",
    """CREATE TABLE IF NOT EXISTS records (
        device_id TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
        received_at REAL NOT NULL, wall REAL NOT NULL, clock TEXT NOT NULL, fields TEXT NOT NULL,
        cose BLOB NOT NULL, PRIMARY KEY (device_id, stream, seq))""",
    """CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)""",
    # Commands sent and their results (backend/commands.py): a row is 'sent', maybe 'pending' (a
    # renewal's CSR), then final ('ok' / 'failed' / 'refused'), and a final result is never replaced.
    """CREATE TABLE IF NOT EXISTS results (
        device_id TEXT NOT NULL, command_id TEXT NOT NULL, type TEXT, status TEXT NOT NULL,
        code TEXT, message TEXT, data TEXT, cose BLOB, sent_at REAL, received_at REAL,
        PRIMARY KEY (device_id, command_id))""",
)
# The first results table held raw payloads keyed by a digest; an old database keeps it aside.
_OLD_RESULTS = "ALTER TABLE results RENAME TO results_raw_v1"


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


class BackendDb:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._lock = threading.RLock()
        with self.tx() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
            if "body" in columns:
                db.execute(_OLD_RESULTS)
            for stmt in SCHEMA:
                db.execute(stmt)

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
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

    def patient_of(self, device_id: str) -> str | None:
        rows = self.query("SELECT patient_ref FROM devices WHERE device_id = ?", (device_id,))
        return rows[0][0] if rows else None
