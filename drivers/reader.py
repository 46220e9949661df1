"""One read of one meter: identity, clock offset, every verified record.

``read_meter`` is what the agent calls when a meter appears. Errors before the first record
(port, probe, identity) raise; an error mid-dump returns what verified with ``complete=False``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from agent.errors import DriverError, NoResponse, PortError
from agent.models import GlucoseReading
from drivers.base import MeterRead, SerialTransport
from drivers.registry import open_device, probe

log = logging.getLogger(__name__)


def read_meter(
    url: str,
    protocol: str | None,
    *,
    wall_clock: Callable[[], dt.datetime],
    timeout: float | None = None,
) -> MeterRead:
    """Read the meter on ``url``; ``protocol`` None means probe first.

    ``wall_clock`` returns the agent's naive local time; the clock offset is
    meter clock - wall clock in seconds (None if the meter clock could not be read).
    """
    if protocol is None:
        protocol = probe(url)
        if protocol is None:
            raise NoResponse(f"no supported meter answered on {url}")
    device = open_device(protocol, url, timeout=timeout)
    try:
        identity = device.identify()
        offset: float | None
        try:
            meter_now = device.read_clock()
            offset = round((meter_now - wall_clock()).total_seconds(), 3)
        except PortError:
            raise
        except DriverError as exc:
            log.warning("%s %s: clock not read (%s); offset unknown", protocol, identity.serial, exc)
            offset = None
        readings: list[GlucoseReading] = []
        try:
            for reading in device.read_records():
                readings.append(reading.with_offset(offset))
        except DriverError as exc:
            log.warning("%s %s: read cut off after %d records: %s", protocol, identity.serial, len(readings), exc)
            return MeterRead(identity, tuple(readings), complete=False, error=f"{type(exc).__name__}: {exc}")
        return MeterRead(identity, tuple(readings), complete=True)
    finally:
        if isinstance(device, SerialTransport):
            device.close()
