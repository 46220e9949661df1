"""What every meter simulator shares: the pty, byte pacing at a baud rate, faults, unplugging."""

from __future__ import annotations

import abc
import datetime as dt
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

from drivers.models import GlucoseReading
from drivers.simulators.faults import NO_FAULTS, Faults, Mangler
from drivers.simulators.pty_link import PtyLink

log = logging.getLogger(__name__)

#: Real meters: 9600 baud, 8N1 = 10 bits per byte on the wire.
DEFAULT_BAUD = 9600
BITS_PER_BYTE = 10


class Unplugged(Exception):
    """Raised inside a simulator when the fault plan pulls the cable."""


class Stopped(Exception):
    """Raised inside a simulator when it was asked to stop while writing."""


class Simulator(abc.ABC):
    """A meter on the master side of a pty. Subclasses implement ``feed`` (bytes from the host)."""

    PROTOCOL: ClassVar[str]
    DEFAULT_SERIAL: ClassVar[str]

    def __init__(
        self,
        link: PtyLink,
        records: Sequence[GlucoseReading],
        faults: Faults = NO_FAULTS,
        *,
        baud: float | None = DEFAULT_BAUD,
        serial: str | None = None,
        clock_skew_s: float = 0.0,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.link = link
        self.records = list(records)  # newest first, as the meter sends them
        self.faults = faults
        self.mangler = Mangler(faults)
        self.baud = baud
        first_serial = self.records[0].meter_serial if self.records else ""
        self.serial = serial or first_serial or self.DEFAULT_SERIAL
        self.clock_skew_s = clock_skew_s
        self.stop_event = stop_event or threading.Event()
        self.commands_seen: list[bytes] = []
        self.records_sent = 0
        self._wire_free_at = 0.0
        os.set_blocking(link.master, False)
        self.setup()

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Per-protocol state, called at the end of ``__init__``."""

    # --- host side --------------------------------------------------------------------------
    @abc.abstractmethod
    def feed(self, data: bytes) -> None:
        """Handle bytes the host wrote (may reply synchronously)."""

    def tick(self) -> None:  # noqa: B027 - optional hook
        """Called when the host was silent for a poll interval (timeouts)."""

    # --- meter side -------------------------------------------------------------------------
    def meter_now(self) -> dt.datetime:
        return dt.datetime.now() + dt.timedelta(seconds=self.clock_skew_s)

    def reply_delay(self) -> None:
        if self.faults.slow_s:
            self._sleep(self.faults.slow_s)

    def before_record(self) -> None:
        """Call before sending each record: pulls the cable when the fault plan says so."""
        if self.faults.unplug_after is not None and self.records_sent >= self.faults.unplug_after:
            self._wait_consumed()
            raise Unplugged

    def _wait_consumed(self, limit_s: float = 2.0) -> None:
        """Let the host read what is already on the wire (a pty drops unread bytes on hangup)."""
        deadline = time.monotonic() + limit_s
        quiet = 0
        while time.monotonic() < deadline and quiet < 3:  # the pty pushes written bytes asynchronously
            try:
                pending = struct.unpack("i", fcntl.ioctl(self.link.slave, termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError:
                return
            quiet = 0 if pending else quiet + 1
            self._sleep(0.02)

    def send(self, data: bytes) -> None:
        """Write bytes so the last one arrives when it would on a real line at ``baud``."""
        if self.baud:
            now = time.monotonic()
            self._wire_free_at = max(now, self._wire_free_at) + len(data) * BITS_PER_BYTE / self.baud
            self._sleep(self._wire_free_at - now)
        view = memoryview(data)
        while view:
            if self.stop_event.is_set():
                raise Stopped
            _, writable, _ = select.select([], [self.link.master], [], 0.1)
            if not writable:
                continue
            try:
                n = os.write(self.link.master, view)
            except BlockingIOError:
                continue
            view = view[n:]

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.stop_event.wait(seconds):
            raise Stopped

    # --- loop -------------------------------------------------------------------------------
    def serve(self, poll_s: float = 0.05) -> None:
        """Serve until stopped or unplugged (then the link is closed: the device is gone)."""
        log.info("%s simulator on %s (%d records, %s)", self.PROTOCOL, self.link.link, len(self.records), self.faults)
        try:
            while not self.stop_event.is_set():
                data = self.link.read(timeout=poll_s)
                if data:
                    self.feed(data)
                else:
                    self.tick()
        except Unplugged:
            log.info("%s simulator: cable pulled after %d records", self.PROTOCOL, self.records_sent)
            self.link.close()
        except Stopped:
            pass
