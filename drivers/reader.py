"""One read of one device, meter or pen: identity, clock, every verified record.

``read_device`` is what the agent calls when a device appears on a port; for a meter it is
``read_meter``, for a pen reader the pen driver's ``read_pen``. Errors before the first record
(port, probe, identity) raise; an error mid-dump returns what verified with ``complete=False``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from drivers.base import SerialTransport
from drivers.errors import DriverError, NoResponse, PortError
from drivers.models import GlucoseReading, MeterRead
from drivers.registry import AUTO, driver_module, is_pen, open_device, probe

if TYPE_CHECKING:  # the pen driver (2.4 MiB resident) loads only where a pen is configured
    from drivers.novopen import PenRead

log = logging.getLogger(__name__)


def read_device(
    url: str,
    protocol: str,
    *,
    wall_clock: Callable[[], dt.datetime],
    insulin: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> MeterRead | PenRead:
    """Read whatever ``protocol`` (a registry name, or ``auto`` to probe for a meter) names on ``url``.

    A pen reader with no pen in its field raises ``NoPen``; ``insulin`` maps pen serial -> insulin.
    """
    if is_pen(protocol):
        with driver_module(protocol).Device(url) as device:
            result: PenRead = device.read_pen(insulin=insulin)
        return result
    return read_meter(url, None if protocol == AUTO else protocol, wall_clock=wall_clock, timeout=timeout)


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
