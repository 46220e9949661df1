"""The command journal: exactly-once bookkeeping for cloud commands, in the buffer's database
(table ``commands``, and the cloud time floor in ``meta``; schema in schema.py)."""

from __future__ import annotations

import time

from agent.buffer.store import Store


class CommandJournal:
    """Exactly-once bookkeeping for cloud commands, in the buffer's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def lookup(self, cmd_id: str) -> tuple[str, bytes | None] | None:
        rows = self.store._read("SELECT state, result FROM commands WHERE id = ?", (cmd_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def start(self, cmd_id: str, ctype: str, issued_at: float, now: float | None = None) -> bool:
        """Record the command as started (and raise the cloud time floor). False if already known."""
        now = time.time() if now is None else now
        with self.store.transaction() as db:
            cur = db.execute(
                "INSERT INTO commands (id, type, received_at, state) VALUES (?, ?, ?, 'started') ON CONFLICT(id) DO NOTHING",
                (cmd_id, ctype, now),
            )
            db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'cloud_floor'", (int(issued_at),))
            return cur.rowcount == 1

    def finish(self, cmd_id: str, result: bytes) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE commands SET state = 'done', result = ? WHERE id = ?", (result, cmd_id))

    def interrupted(self) -> list[tuple[str, str]]:
        """Commands a crash left started: (id, type)."""
        return [(i, t) for i, t in self.store._read("SELECT id, type FROM commands WHERE state = 'started'")]

    def cloud_floor(self) -> float:
        return float(self.store._read("SELECT value FROM meta WHERE key = 'cloud_floor'")[0][0])

    def prune(self, older_than: float) -> int:
        """Forget done commands past the longest lifetime a command may have (replays are expired by then)."""
        with self.store.transaction() as db:
            return db.execute("DELETE FROM commands WHERE state = 'done' AND received_at < ?", (older_than,)).rowcount
