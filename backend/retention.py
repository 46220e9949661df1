"""The cloud's retention period, enforced from the running service (``serve --retention-days``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from backend.db import BackendDb

log = logging.getLogger(__name__)


class RetentionSweeper:
    """Enforces the cloud's retention period from the running service: a sweep at start, then every interval.

    Age is judged by ``received_at``, the cloud's own clock: a box's clock may be wrong by years.
    """

    def __init__(self, db: BackendDb, days: float, interval_s: float, clock: Callable[[], float] = time.time) -> None:
        if days <= 0 or interval_s <= 0:
            raise ValueError("retention days and interval must be positive")
        self.db = db
        self.days = days
        self.interval_s = interval_s
        self.clock = clock

    def sweep(self) -> dict[str, int]:
        deleted = self.db.purge_before(self.clock() - self.days * 86_400)
        if deleted:
            log.info("retention %gd: deleted %s", self.days, ", ".join(f"{n} {t}" for t, n in sorted(deleted.items())))
        return deleted

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # a failed sweep is retried at the next interval, never ends the service
                log.exception("retention sweep failed")
            if stop.wait(self.interval_s):
                return
