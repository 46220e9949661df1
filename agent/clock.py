"""The box's sense of time: wall clock with a quality flag, boot id, monotonic time.

The box has no battery-backed clock: after power-up it may believe it is 1970
until NTP syncs. Every record carries the wall time *and* how far to trust it,
plus (boot id, monotonic) which is always right within one boot.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import enum
import functools
import logging
import shlex
import time
import uuid
from pathlib import Path

# Anything earlier than this cannot be a real time on a box built after it.
CLOCK_FLOOR = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_TIME_ERROR = 5  # adjtimex(2): clock not synchronised
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
FAR_OFF_S = 300.0  # a clock this far from the cloud's signed time is stepped to it
log = logging.getLogger(__name__)


class ClockQuality(enum.StrEnum):
    UNSET = "unset"  # before CLOCK_FLOOR: certainly wrong
    UNSYNCED = "unsynced"  # plausible, but the kernel says no time source disciplines it
    SYNCED = "synced"  # kernel reports NTP/PPS synchronisation, or the cloud's sync_time command set it
    CLOUD = "cloud"  # set from the cloud's signed time over the link (agent/wire/clocksync.py): +- one round trip


@dataclasses.dataclass(frozen=True, slots=True)
class Anchor:
    """The cloud's signed time ``true`` seen at ``monotonic`` (CLOCK_BOOTTIME) of boot ``boot_id``: any record
    of that boot was taken at ``true - (monotonic - record.monotonic)``, whatever its wall clock said."""

    true: float
    boot_id: bytes
    monotonic: float
    offset_s: float  # true - the box's wall clock at that moment


@dataclasses.dataclass(frozen=True, slots=True)
class Timestamp:
    wall: float  # Unix seconds by the box's clock
    quality: ClockQuality
    boot_id: bytes  # 16 bytes
    monotonic: float  # seconds since boot (CLOCK_BOOTTIME: counts suspend too)


class _Timex(ctypes.Structure):
    # Only the leading fields matter; the kernel struct is larger, so pad generously.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 256)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # The process's own symbols (dlopen(NULL)) include the C library's, glibc's and musl's alike: no
    # ctypes.util.find_library, which runs ldconfig or gcc (neither is on OpenWrt) and imports subprocess.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _kernel_synced() -> bool | None:
    """adjtimex() read-only query; None where it is unavailable."""
    libc = _libc()
    if libc is None:
        return None
    try:
        tx = _Timex()
        tx.modes = 0  # read only
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


def boot_id() -> bytes:
    try:
        return uuid.UUID(_BOOT_ID.read_text().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


class Clock:
    """Source of timestamps. ``trusted`` is set when the cloud's sync_time command set the clock."""

    def __init__(self) -> None:
        self._boot_id = boot_id()
        self.trusted = False
        self._synced_cache = False
        self._synced_at = -10.0
        self.anchor: Anchor | None = None  # the last authenticated time learnt from the cloud

    def quality(self, wall: float | None = None) -> ClockQuality:
        wall = time.time() if wall is None else wall
        if wall < CLOCK_FLOOR.timestamp():
            return ClockQuality.UNSET
        if self.trusted or self._synced():
            return ClockQuality.SYNCED
        if self.anchor is not None and not self.may_be_off():
            return ClockQuality.CLOUD
        return ClockQuality.UNSYNCED

    def needs_time(self) -> bool:
        """Ask the cloud for its signed time: no NTP disciplines the clock and the cloud has not told us yet."""
        if time.time() < CLOCK_FLOOR.timestamp():
            return self.may_be_off()
        return not (self.trusted or self._synced() or self.anchor is not None)

    def may_be_off(self) -> bool:
        """No authenticated time vouches for the clock now: none learnt, or the clock moved since by more
        than FAR_OFF_S (a step, or a failed settime). Otherwise a certificate out of its window really is."""
        if self.anchor is None:
            return True
        a = self.anchor
        expected = a.true + time.clock_gettime(time.CLOCK_BOOTTIME) - a.monotonic
        return abs(expected - time.time()) > FAR_OFF_S

    def learn(self, true: float, settime_command: str, rtt_s: float = 0.0) -> Anchor:
        """Take the cloud's *authenticated* time (never call this with anything else). Steps the system clock
        with ``settime_command`` when it is more than FAR_OFF_S off; records the anchor either way."""
        true += rtt_s / 2  # the reply was signed about half a round trip ago
        mono = time.clock_gettime(time.CLOCK_BOOTTIME)
        offset = true - time.time()
        if abs(offset) > FAR_OFF_S:
            import subprocess  # stepping the clock is rare: not held at steady state (docs/field.md)

            argv = shlex.split(settime_command.replace("{epoch}", str(round(true))))
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("clock: cannot run %s: %s", argv[0], exc)
            else:
                if proc.returncode != 0:
                    log.error("clock: %s exited %d: %s", argv[0], proc.returncode, proc.stderr.strip()[-200:])
                else:
                    log.info("clock: stepped by %+.0f s to the cloud's signed time", offset)
        self.anchor = Anchor(true=true, boot_id=self._boot_id, monotonic=mono, offset_s=round(offset, 3))
        return self.anchor

    def _synced(self) -> bool:
        # A meter read signs hundreds of records in a burst: ask the kernel at most once a second.
        now = time.monotonic()
        if now - self._synced_at > 1.0:
            self._synced_cache = bool(_kernel_synced())
            self._synced_at = now
        return self._synced_cache

    def now(self) -> Timestamp:
        wall = time.time()
        return Timestamp(
            wall=wall,
            quality=self.quality(wall),
            boot_id=self._boot_id,
            monotonic=time.clock_gettime(time.CLOCK_BOOTTIME),
        )

    @staticmethod
    def local_naive() -> dt.datetime:
        """Wall clock as naive local time, the form meter clocks are compared in."""
        return dt.datetime.now().replace(microsecond=0)
