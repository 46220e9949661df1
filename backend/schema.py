"""The reference cloud's tables and their one-time migrations, applied by ``BackendDb`` when it opens
the database (``backend/db.py``, where every query lives)."""

from __future__ import annotations

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
    # A device identity's patient over time. A device key is bound once: a new patient needs a
    # deprovisioned box (new key, new device id), so an open binding is never re-pointed.
    """CREATE TABLE IF NOT EXISTS bindings (
        id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, patient_ref TEXT NOT NULL,
        valid_from REAL NOT NULL, valid_to REAL)""",
    """CREATE INDEX IF NOT EXISTS bindings_device ON bindings (device_id, valid_to)""",
    # Validly signed records the cloud cannot store as data (a field out of range): kept whole,
    # so acknowledging them loses nothing, and counted.
    """CREATE TABLE IF NOT EXISTS quarantine (
        digest TEXT PRIMARY KEY, device_id TEXT NOT NULL, binding_id INTEGER, stream TEXT NOT NULL,
        received_at REAL NOT NULL, reason TEXT NOT NULL, cose BLOB NOT NULL)""",
    # Erasure audit: who, when, how many rows; the patient only as a keyed hash (never the reference).
    """CREATE TABLE IF NOT EXISTS erasures (
        id INTEGER PRIMARY KEY, at REAL NOT NULL, operator TEXT NOT NULL, patient_hmac TEXT NOT NULL,
        devices INTEGER NOT NULL, rows INTEGER NOT NULL, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)""",
    # Commands sent and their results (backend/commands.py): a row is 'sent', maybe 'pending' (a
    # renewal's CSR), then final ('ok' / 'failed' / 'refused'), and a final result is never replaced.
    """CREATE TABLE IF NOT EXISTS results (
        device_id TEXT NOT NULL, command_id TEXT NOT NULL, type TEXT, status TEXT NOT NULL,
        code TEXT, message TEXT, data TEXT, cose BLOB, sent_at REAL, received_at REAL,
        PRIMARY KEY (device_id, command_id))""",
)
# The first results table held raw payloads keyed by a digest; an old database keeps it aside.
OLD_RESULTS = "ALTER TABLE results RENAME TO results_raw_v1"
# Databases from before bindings: every device gets the binding it was provisioned with, and its
# records that binding (the first attribution of those rows, not a rewrite of one).
MIGRATE_BINDINGS = (
    "INSERT INTO bindings (device_id, patient_ref, valid_from) SELECT device_id, patient_ref, created_at "
    "FROM devices WHERE device_id NOT IN (SELECT device_id FROM bindings)",
    "UPDATE records SET binding_id = (SELECT id FROM bindings b WHERE b.device_id = records.device_id "
    "AND b.valid_to IS NULL) WHERE binding_id IS NULL",
)
