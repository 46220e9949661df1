"""Protocol name -> driver module; open a driver; probe which protocol speaks on a port.

Probing sends only read-only queries, cheapest and least intrusive first:
Ultra 2 ``DM?`` (version), Contour ``EOT`` nudge (the meter answers ``ENQ``; we never ACK it,
so no transfer starts), UltraEasy ``DISC`` packet (link reset). Nothing that erases or sets the meter.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from agent.errors import ConfigError, DriverError, PortError
from drivers.base import MeterDriver, SerialTransport

log = logging.getLogger(__name__)

PROTOCOLS: dict[str, str] = {
    "onetouch-ultra2": "drivers.onetouch_ultra2",
    "onetouch-ultraeasy": "drivers.onetouch_ultraeasy",
    "contour-astm": "drivers.contour_astm",
}
#: Probe order: each probe's bytes are ignored by the other meters. Contour comes before
#: UltraEasy so that no ACK byte (inside an UltraEasy packet) reaches a Contour meter that
#: has just sent ENQ (that ACK would start a transfer).
PROBE_ORDER = ("onetouch-ultra2", "contour-astm", "onetouch-ultraeasy")
PROBE_TIMEOUT = 0.6


class UnknownProtocol(ConfigError):
    """The configured protocol name is not one of PROTOCOLS."""


def driver_module(protocol: str) -> ModuleType:
    try:
        name = PROTOCOLS[protocol]
    except KeyError:
        raise UnknownProtocol(f"unknown meter protocol {protocol!r}; known: {', '.join(PROTOCOLS)}") from None
    return importlib.import_module(name)


def open_device(protocol: str, url: str, *, timeout: float | None = None) -> MeterDriver:
    """Open ``url`` with the driver for ``protocol`` (raises PortError if it cannot be opened)."""
    device: MeterDriver = driver_module(protocol).Device(url, timeout=timeout)
    return device


def probe(url: str, *, timeout: float = PROBE_TIMEOUT) -> str | None:
    """The protocol a meter on ``url`` answers, or None. Raises PortError if the port cannot be used."""
    port = SerialTransport(url, timeout=timeout)
    try:
        for protocol in PROBE_ORDER:
            try:
                if driver_module(protocol).probe_port(port):
                    log.info("probe %s: %s answered", url, protocol)
                    return protocol
            except PortError:
                raise
            except DriverError as exc:
                log.debug("probe %s: %s: %s", url, protocol, exc)
        return None
    finally:
        port.close()
