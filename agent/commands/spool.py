"""The executor's files on flash: the inbox (a message is durable here before the broker gets its
PUBACK) and the signed results outbox (a result waits here until the broker's PUBACK).

Both are files rather than rows of the buffer: a result travels on its own topic, is published
once per connection and is done at the broker's PUBACK, whereas the buffer's outbox is the
gap-free, sequence-numbered telemetry stream acknowledged end-to-end by the cloud's signed acks.
The inbox must be written from the uplink thread before the PUBACK goes out, while the buffer's
connection may be held by a long upload transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.commands.ports import Link
from agent.errors import GlucoagentError, LinkError
from agent.fsutil import atomic_write
from agent.wire.command import MAX_COMMAND_BYTES
from agent.wire.profiles import RESULTS

log = logging.getLogger(__name__)

MAX_UNKNOWN_RESULTS = 50  # refusals of unauthenticated messages kept waiting for the link


class Inbox:
    """Messages acknowledged to the broker and not yet handled by the worker."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def leftover(self) -> list[Path]:
        """What an earlier run acknowledged and never handled (taken before any thread runs)."""
        return sorted(self.folder.glob("*.cose"))

    def store(self, payload: bytes) -> Path | None:
        """Make the message durable before its PUBACK goes out (the caller returns only after this).

        Messages too big to be a command are refused anyway and not worth a flash write.
        """
        if len(payload) > MAX_COMMAND_BYTES:
            return None
        path = self.folder / f"{time.time_ns():020d}.cose"
        try:
            atomic_write(path, payload)
        except GlucoagentError as exc:
            log.error("command could not be stored before its acknowledgement: %s", exc)
            return None
        return path


class ResultOutbox:
    """Signed results as files, published in order and removed on PUBACK (or kept for the next link)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in folder.glob("*.cose"))
        self._next = int(names[-1].split("-", 1)[0]) + 1 if names else 1
        self._link: object = None
        self._inflight: dict[str, int] = {}
        self._work = True  # files may be left from before a restart; cleared once the folder is empty
        self.on_put: Callable[[str, bytes], None] | None = None  # told of each result (AWS Jobs: agent/link/aws_jobs.py)

    def put(self, cmd_id: str, payload: bytes) -> None:
        if not cmd_id and len(list(self.folder.glob("*-.cose"))) >= MAX_UNKNOWN_RESULTS:
            log.warning("results outbox: too many refusals waiting; this one is only logged")
            return
        atomic_write(self.folder / f"{self._next:012d}-{cmd_id}.cose", payload, mode=0o600)
        self._next += 1
        self._work = True
        if self.on_put is not None:
            self.on_put(cmd_id, payload)

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.cose")))

    def flush(self, uplink: Link) -> None:
        """Uplink thread, every loop pass: cheap when there is nothing to send."""
        link = uplink.link
        if not self._work or link is None or not link.connected:
            return
        if link is not self._link:  # a new connection: nothing published on the old one counts
            self._link, self._inflight = link, {}
        for path in sorted(self.folder.glob("*.cose")):
            mid = self._inflight.get(path.name)
            try:
                if mid is None:
                    self._inflight[path.name] = uplink.send(RESULTS, path.read_bytes())
                    continue
                ok = link.acked(mid)
            except (LinkError, OSError) as exc:
                log.debug("results outbox: %s", exc)
                return
            if ok:
                path.unlink(missing_ok=True)
                del self._inflight[path.name]
            elif ok is False:
                del self._inflight[path.name]  # refused by the broker: publish again
        self._work = bool(self._inflight) or any(self.folder.glob("*.cose"))

    def waiting(self) -> list[tuple[str, bytes]]:
        """(command id, signed result) of every result not yet acknowledged by the broker, oldest first."""
        return [(p.stem.split("-", 1)[1], p.read_bytes()) for p in sorted(self.folder.glob("*.cose"))]
