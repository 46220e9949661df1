"""The buffer's tables, as migrations keyed by ``PRAGMA user_version`` (applied in order by store.py,
each in one transaction; docs/storage.md).

A buffer must survive an update's rollback (docs/updates.md): the previous agent must read and write the
buffer the new one migrated, readings and all. So migrations are *additive* (a new table, a new index, a
new nullable or defaulted column, new ``meta`` rows; nothing dropped, renamed or re-typed, no new
constraint on existing rows), and each declares in ``OLDEST_READER`` the oldest schema version whose agent
can still use a buffer at its version. The store records that in ``meta`` (``oldest_reader``); an agent of
an older schema opens a newer buffer as it is when its own version is at least that, and refuses it
otherwise. A migration that cannot be additive declares its own version, and its release must not be
shipped as an update that may roll back (tests/unit/agent/buffer/test_schema_rules.py checks the rule)."""

from __future__ import annotations

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            stream TEXT NOT NULL CHECK (stream IN ('c', 'h')),
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            priority INTEGER NOT NULL,
            accepted_at REAL NOT NULL,
            cose BLOB NOT NULL,
            acked_at REAL,
            UNIQUE (stream, seq))""",
        """CREATE INDEX outbox_pending ON outbox (priority DESC, id) WHERE acked_at IS NULL""",
        """CREATE INDEX outbox_acked ON outbox (acked_at) WHERE acked_at IS NOT NULL""",
        """CREATE TABLE ledger (
            source TEXT NOT NULL, record_key TEXT NOT NULL, seq INTEGER NOT NULL,
            PRIMARY KEY (source, record_key)) WITHOUT ROWID""",
        """CREATE TABLE conditions (code TEXT PRIMARY KEY, since REAL NOT NULL, message TEXT NOT NULL)""",
        """CREATE TABLE sources (
            source TEXT PRIMARY KEY, protocol TEXT NOT NULL, port TEXT NOT NULL,
            last_seen REAL NOT NULL, last_complete INTEGER NOT NULL)""",
        """INSERT INTO meta (key, value) VALUES ('next_seq_c', 1), ('next_seq_h', 1), ('last_ack', 0)""",
    ),
    2: (
        """CREATE TABLE commands (
            id TEXT PRIMARY KEY, type TEXT NOT NULL, received_at REAL NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('started', 'done')), result BLOB)""",
        """INSERT INTO meta (key, value) VALUES ('cloud_floor', 0)""",
    ),
}
# version -> the oldest schema version that can read and write a buffer at that version
OLDEST_READER: dict[int, int] = {1: 1, 2: 1}
SCHEMA_VERSION = max(MIGRATIONS)
