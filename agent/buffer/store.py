"""The SQLite store-and-forward buffer. All SQL of the agent lives in agent/buffer/: here, and the
command journal's few statements in journal.py (same database, same connection).

Durability: WAL with ``locking_mode=EXCLUSIVE`` and ``synchronous=FULL``. Exclusive
locking keeps the WAL index in heap memory, so no shared writable mmap is needed
(JFFS2 has none); it writes about 40 % fewer bytes per reading than a rollback
journal. A committed row survives power loss; see docs/storage.md. The price: one
process at a time (the daemon publishes its state for `status`, agent/snapshot.py).

One process owns the connection (the daemon); it is guarded by a lock and every
write runs in ``transaction()`` = ``BEGIN IMMEDIATE`` ... ``COMMIT``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.buffer.schema import MIGRATIONS, OLDEST_READER, SCHEMA_VERSION
from agent.errors import BufferFull, StorageUnavailable, StoreCorrupt, StoreError
from agent.fsutil import atomic_write

if TYPE_CHECKING:  # intake.py imports this module
    from agent.buffer.intake import Intake

log = logging.getLogger(__name__)

CLINICAL = "c"  # readings, doses, alerts: one gap-free sequence
HEALTH = "h"  # health samples: their own sequence, first to go when full
PRIO_HEALTH, PRIO_RECORD, PRIO_ALERT = 0, 1, 2
PAGE_SIZE = 1024  # small pages: fewer bytes rewritten per commit on flash
WAL_LIMIT = 1 << 20  # the WAL file is truncated back to this after a checkpoint
_CHUNK = 400  # SQL parameters per IN (...) list
ALERT_RESERVE = 16  # alerts may exceed the limit by this much
SEQ_BLOCK = 10_000  # sequence numbers reserved ahead in the side file (one small write per block)



@dataclasses.dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    stream: str
    seq: int
    kind: str
    cose: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    pending_clinical: int
    oldest_pending_at: float | None
    total_rows: int
    last_ack: float | None
    next_seq: int


def _translate(exc: sqlite3.Error, what: str) -> StoreError:
    text = str(exc).lower()
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
        return StoreCorrupt(f"{what}: database is corrupt ({exc})")
    if "locked" in text:
        return StoreError(f"{what}: the buffer is in use by another process (is the agent running?)")
    if "full" in text or "readonly" in text or "read-only" in text or "i/o" in text or "unable to open" in text:
        return StorageUnavailable(f"{what}: {exc}")
    return StoreError(f"{what}: {exc}")


class Store:
    def __init__(
        self, path: Path, *, max_records: int = 200_000, retention_s: float = 0.0, busy_timeout_s: float = 10.0
    ) -> None:
        self.path = path
        self.max_records = max_records
        self.retention_s = retention_s
        self._lock = threading.RLock()
        self._reserve_path = path.with_name(path.name + ".seq")
        self._reserve = self._reserved()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open buffer {path}: {exc}") from exc
        try:
            self._configure()
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise _translate(exc, f"opening {path}") from exc

    # --- connection -------------------------------------------------------------------------
    def _configure(self) -> None:
        self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # effective on a new file only
        self._db.execute("PRAGMA locking_mode = EXCLUSIVE")  # before WAL: no -shm mmap (JFFS2)
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"journal_mode WAL refused (got {mode})")
        self._db.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit: durable on power loss
        self._db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        self._db.execute("PRAGMA cache_size = -512")  # 512 KiB page cache: the box has 64-256 MB of RAM
        self._db.execute("PRAGMA foreign_keys = ON")

    def _migrate(self) -> None:
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            self._open_newer(current)
            return
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('oldest_reader', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (OLDEST_READER[version],),
                )
                if version == 1:
                    self._start_after_reserve(db)
            log.info("buffer schema migrated to version %d", version)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def _open_newer(self, current: int) -> None:
        """A buffer a newer agent migrated (this one was rolled back): used as it is when every migration
        above this agent's schema was additive, i.e. the buffer's declared oldest reader is not newer."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'oldest_reader'").fetchone()
        oldest = int(row[0]) if row else current
        if oldest > SCHEMA_VERSION:
            raise StoreError(
                f"buffer schema {current} is newer than this agent ({SCHEMA_VERSION}) and needs at least "
                f"schema {oldest} to be read"
            )
        log.warning(
            "buffer schema %d from a newer agent: its changes are additive (readable from schema %d), "
            "used as it is by this agent (schema %d)", current, oldest, SCHEMA_VERSION,
        )  # fmt: skip

    def _reserved(self) -> dict[str, int]:
        try:
            c, h = self._reserve_path.read_text().split()
            return {CLINICAL: int(c), HEALTH: int(h)}
        except (OSError, ValueError):
            return {CLINICAL: 1, HEALTH: 1}

    def _start_after_reserve(self, db: sqlite3.Connection) -> None:
        """A new buffer file continues above every number an earlier file may have used.

        The side file holds, per stream, a bound no issued sequence number reaches; it
        survives a corrupt database being set aside, so numbers are never reused.
        """
        for stream, bound in self._reserve.items():
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (bound, f"next_seq_{stream}"))

    def _reserve_through(self, stream: str, seq: int) -> None:
        if seq < self._reserve[stream]:
            return
        reserved = {**self._reserve, stream: seq + SEQ_BLOCK}
        atomic_write(self._reserve_path, f"{reserved[CLINICAL]} {reserved[HEALTH]}\n".encode())
        self._reserve = reserved

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _translate(exc, "begin") from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _translate(exc, "transaction") from exc
                raise

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:  # type: ignore[type-arg]
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "read") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    # --- intake -----------------------------------------------------------------------------
    def known_keys(self, source: str, keys: Collection[str]) -> set[str]:
        """Which of ``keys`` the ledger already holds for ``source`` (read-only)."""
        with self._lock:
            return self._known(self._db, source, list(keys))

    def newest_key(self, source: str) -> str | None:
        """The ledger key ``source`` stored last (highest sequence number): where a BLE meter's next read starts.
        It is written in the same transaction as its record, so it is never ahead of what was stored."""
        rows = self._read("SELECT record_key FROM ledger WHERE source = ? ORDER BY seq DESC LIMIT 1", (source,))
        return str(rows[0][0]) if rows else None

    @staticmethod
    def _known(db: sqlite3.Connection, source: str, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT record_key FROM ledger WHERE source = ? AND record_key IN ({marks})",  # noqa: S608
                [source, *chunk],
            )
            found.update(r[0] for r in rows)
        return found

    def accept(
        self,
        items: Sequence[Intake],
        *,
        source: str | None = None,
        now: float | None = None,
        complete_keys: Collection[str] | None = None,
        partial: bool = False,
    ) -> list[int]:
        """Accept a batch in ONE transaction: sequence numbers, signatures, rows and ledger.

        Items whose ledger key is already known are skipped (returned list omits them).
        ``complete_keys``: after a complete read, ledger keys of ``source`` not in it are
        pruned (the meter has forgotten those records, they cannot come back).
        Raises BufferFull when clinical records would exceed the limit: nothing is written, or
        with ``partial`` the leading items that fit are committed and listed in ``exc.accepted``
        (the meter keeps the rest, and the ledger only holds what was stored).
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            keyed = [i.record_key for i in items if i.record_key is not None]
            if keyed and source is None:
                raise StoreError("records with ledger keys need a source")
            known = self._known(db, source, keyed) if source is not None and keyed else set()
            fresh = [i for i in items if i.record_key is None or i.record_key not in known]
            fresh = list({(i.record_key or id(i)): i for i in fresh}.values())  # a key twice in one batch
            room = self._make_room(db, fresh, partial=partial)
            truncated = room < len(fresh)
            # Never separate a kept record from the alerts right behind it (they would never be raised
            # again: the record is in the ledger now); alerts may use the reserve for that.
            while room < len(fresh) and fresh[room].record_key is None and fresh[room].priority == PRIO_ALERT:
                room += 1
            fresh = fresh[:room]
            seqs: list[int] = []
            counters = {
                stream: db.execute("SELECT value FROM meta WHERE key = ?", (f"next_seq_{stream}",)).fetchone()[0]
                for stream in {i.stream for i in fresh}
            }
            rows, ledger = [], []
            for item in fresh:
                seq = counters[item.stream]
                counters[item.stream] = seq + 1
                self._reserve_through(item.stream, seq)
                rows.append((item.stream, seq, item.kind, item.priority, now, item.build(seq)))
                if item.record_key is not None:
                    ledger.append((source, item.record_key, seq))
                seqs.append(seq)
            db.executemany(
                "INSERT INTO outbox (stream, seq, kind, priority, accepted_at, cose) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            db.executemany("INSERT INTO ledger (source, record_key, seq) VALUES (?, ?, ?)", ledger)
            db.executemany(
                "UPDATE meta SET value = ? WHERE key = ?", [(v, f"next_seq_{k}") for k, v in counters.items()]
            )
            if complete_keys is not None and source is not None and not truncated:
                self._prune_ledger(db, source, set(complete_keys))
        if truncated:
            raise BufferFull(
                f"buffer full: {len(seqs)} records stored, the rest refused (limit {self.max_records})", seqs
            )
        return seqs

    def _make_room(self, db: sqlite3.Connection, items: Sequence[Intake], *, partial: bool = False) -> int:
        """Evict what may go to fit ``items``; return how many of them fit (raise if none may be taken)."""
        if not items:
            return 0
        total = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        excess = total + len(items) - self.max_records
        if excess <= 0:
            return len(items)
        # Delivered rows kept only for `resend` go first, then health samples, oldest first.
        for condition in ("acked_at IS NOT NULL", f"acked_at IS NULL AND priority = {PRIO_HEALTH}"):
            cur = db.execute(
                f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {condition} ORDER BY id LIMIT ?)",  # noqa: S608
                (excess,),
            )
            excess -= cur.rowcount
            if excess <= 0:
                return len(items)
        if all(i.priority == PRIO_HEALTH for i in items):
            raise BufferFull("buffer full: health sample dropped")
        # Alerts may overdraw by a small reserve so `buffer_full` itself can be sent.
        if all(i.priority == PRIO_ALERT for i in items) and excess <= ALERT_RESERVE:
            return len(items)
        if partial and excess < len(items):
            return len(items) - int(excess)
        raise BufferFull(f"buffer full: {total} records stored, limit {self.max_records}")

    def _prune_ledger(self, db: sqlite3.Connection, source: str, keep: set[str]) -> None:
        stored = [r[0] for r in db.execute("SELECT record_key FROM ledger WHERE source = ?", (source,))]
        gone = [k for k in stored if k not in keep]
        for i in range(0, len(gone), _CHUNK):
            chunk = gone[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            db.execute(f"DELETE FROM ledger WHERE source = ? AND record_key IN ({marks})", [source, *chunk])  # noqa: S608

    # --- upload -----------------------------------------------------------------------------
    def pending(self, limit: int, exclude: Collection[int] = ()) -> list[OutboxRow]:
        """Next unacknowledged rows by priority then age; bounded by ``limit`` whatever the backlog."""
        rows = self._read(
            "SELECT id, stream, seq, kind, cose FROM outbox WHERE acked_at IS NULL ORDER BY priority DESC, id LIMIT ?",
            (limit + len(exclude),),
        )
        out = [OutboxRow(*r) for r in rows if r[0] not in exclude]
        return out[:limit]

    def ack(self, stream: str, seqs: Collection[int], now: float | None = None) -> int:
        """Mark rows delivered (or delete them when nothing is retained). Returns rows newly acked."""
        now = time.time() if now is None else now
        seq_list = list(seqs)
        done = 0
        with self.transaction() as db:
            for i in range(0, len(seq_list), _CHUNK):
                chunk = seq_list[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                where = f"stream = ? AND seq IN ({marks}) AND acked_at IS NULL"
                if self.retention_s > 0:
                    cur = db.execute(f"UPDATE outbox SET acked_at = ? WHERE {where}", [now, stream, *chunk])  # noqa: S608
                else:
                    cur = db.execute(f"DELETE FROM outbox WHERE {where}", [stream, *chunk])  # noqa: S608
                done += cur.rowcount
            if done:
                db.execute("UPDATE meta SET value = ? WHERE key = 'last_ack'", (int(now),))
        return done

    def purge_acked(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self.transaction() as db:
            return db.execute(
                "DELETE FROM outbox WHERE acked_at IS NOT NULL AND acked_at < ?", (now - self.retention_s,)
            ).rowcount

    def retained(self, stream: str, first: int, last: int, limit: int) -> list[OutboxRow]:
        """Rows in a sequence range still on the box (pending or retained after ack), for `resend`."""
        rows = self._read(
            "SELECT id, stream, seq, kind, cose FROM outbox WHERE stream = ? AND seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
            (stream, first, last, limit),
        )
        return [OutboxRow(*r) for r in rows]

    def requeue(self, stream: str, first: int, last: int) -> int:
        """`resend`: rows of a sequence range still retained after their ack become pending again.

        Returns how many were re-queued. The backend de-duplicates by (device, stream, seq) and
        acknowledges them again, which marks them delivered again.
        """
        with self.transaction() as db:
            return db.execute(
                "UPDATE outbox SET acked_at = NULL WHERE stream = ? AND seq BETWEEN ? AND ? AND acked_at IS NOT NULL",
                (stream, first, last),
            ).rowcount

    # --- state for status ---------------------------------------------------------------------
    def stats(self) -> Stats:
        pending, pending_c, oldest = self._read(
            "SELECT count(*), total(stream = 'c'), min(accepted_at) FROM outbox WHERE acked_at IS NULL"
        )[0]
        total = self._read("SELECT count(*) FROM outbox")[0][0]
        meta = dict(self._read("SELECT key, value FROM meta"))
        return Stats(
            pending=pending,
            pending_clinical=int(pending_c),
            oldest_pending_at=oldest,
            total_rows=total,
            last_ack=meta.get("last_ack") or None,
            next_seq=meta["next_seq_c"],
        )

    def set_condition(self, code: str, message: str, now: float | None = None) -> bool:
        """Record an active condition (e.g. buffer_full). Returns True when it is new."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO conditions (code, since, message) VALUES (?, ?, ?) ON CONFLICT(code) DO NOTHING",
                (code, now, message),
            )
            return cur.rowcount == 1

    def clear_condition(self, code: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM conditions WHERE code = ?", (code,)).rowcount == 1

    def conditions(self) -> dict[str, tuple[float, str]]:
        return {code: (since, msg) for code, since, msg in self._read("SELECT code, since, message FROM conditions")}

    def source_seen(self, source: str, protocol: str, port: str, complete: bool, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sources (source, protocol, port, last_seen, last_complete) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(source) DO UPDATE SET protocol = excluded.protocol, port = excluded.port, "
                "last_seen = excluded.last_seen, last_complete = excluded.last_complete",
                (source, protocol, port, now, int(complete)),
            )

    def sources(self) -> list[tuple[str, str, str, float, bool]]:
        return [
            (s, p, port, seen, bool(c))
            for s, p, port, seen, c in self._read(
                "SELECT source, protocol, port, last_seen, last_complete FROM sources"
            )
        ]


def open_store(path: Path, *, max_records: int, retention_s: float) -> tuple[Store, str | None]:
    """Open the buffer; a corrupt file is kept aside for analysis and a fresh one started.

    Returns the store and, when a file was set aside, its new path (the caller raises the alert).
    """
    try:
        store = Store(path, max_records=max_records, retention_s=retention_s)
        verdict = store.integrity_check()
        if verdict == "ok":
            return store, None
        store.close()
        reason = verdict
    except StoreCorrupt as exc:
        reason = str(exc)
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        os.replace(path, aside)
        for suffix in ("-journal", "-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
    except OSError as exc:  # e.g. a read-only file system: the storage error, not a stray OSError
        raise StorageUnavailable(f"buffer {path} is corrupt ({reason}) and cannot be set aside: {exc}") from exc
    log.error("buffer %s is corrupt (%s); kept aside as %s, starting a fresh buffer", path, reason, aside)
    return Store(path, max_records=max_records, retention_s=retention_s), str(aside)
