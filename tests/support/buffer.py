"""Fill a provisioned box's buffer directly (no meter, no daemon): signed, unsent readings."""

from __future__ import annotations

from pathlib import Path

from agent.buffer.intake import Recorder
from agent.buffer.store import Store
from agent.clock import Clock
from agent.config import AlertsSection
from agent.identity.credentials import load_identity
from agent.identity.signer import Signer
from drivers.simulators.records import SERIALS, random_records

ULTRA2 = "onetouch-ultra2"


def fill_buffer(state_dir: Path, count: int, *, seed: int = 1, buffer: Path | None = None) -> list[int]:
    """Sign ``count`` Ultra 2 readings with the box's own key into its buffer, as one meter read.

    Returns the clinical sequence numbers: the readings and the alerts they raise (HIGH/LOW results
    always raise one), exactly what the meter watcher would have stored.
    """
    ident = load_identity(state_dir)
    store = Store(buffer or state_dir / "buffer.db", max_records=max(10_000_000, count))
    try:
        recorder = Recorder(store, Signer(ident.device_id, ident.key, ident.kid, Clock()), AlertsSection())
        readings = random_records(ULTRA2, count, seed=seed)
        return recorder.accept_readings(f"{ULTRA2}:{SERIALS[ULTRA2]}", readings, complete=True)
    finally:
        store.close()
