"""The one list of protocol names: protocol -> driver module; open a driver; probe a port.

Meters and the pen reader are registered alike. The agent's config choices and the command
line's choices come from here (``CONFIG_CHOICES``, ``PROTOCOLS``).

Probing sends only read-only queries, cheapest and least intrusive first:
Ultra 2 ``DM?`` (version), Contour ``EOT`` nudge (the meter answers ``ENQ``; we never ACK it,
so no transfer starts), UltraEasy ``DISC`` packet (link reset). Nothing that erases or sets the meter.
The pen reader is never probed: a port with a reader on it is configured as ``novopen``.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from drivers.base import MeterDriver, SerialTransport
from drivers.errors import DriverError, PortError, UnknownProtocol

log = logging.getLogger(__name__)

#: Glucose meters: their module exports ``Device(SerialTransport, MeterDriver)``, ``probe_port`` and
#: ``decode_capture``.
METERS: dict[str, str] = {
    "onetouch-ultra2": "drivers.onetouch_ultra2",
    "contour-astm": "drivers.contour_astm",
    "onetouch-ultraeasy": "drivers.onetouch_ultraeasy",
}
#: Insulin pens (through an NFC reader): their module exports ``Device`` with ``read_pen``.
PENS: dict[str, str] = {"novopen": "drivers.novopen"}
DEFAULT_PEN = "novopen"  # a ``pen`` section of the config without a protocol
PROTOCOLS: dict[str, str] = {**METERS, **PENS}
#: Bluetooth LE health profiles (docs/ble.md): protocol -> its pure codec module. Not serial: never
#: probed, not a ``protocol`` of a serial port; read through drivers.ble.central on an HCI controller.
BLE: dict[str, str] = {"ble-glucose": "drivers.ble.gls", "ble-bp": "drivers.ble.bls"}
#: What ``glucoagent simulate`` can run.
SIMULATED: tuple[str, ...] = (*PROTOCOLS, *BLE)
#: A configured port may leave the protocol to the probe (meters only).
AUTO = "auto"
CONFIG_CHOICES: tuple[str, ...] = (AUTO, *PROTOCOLS)
#: Probe order: each probe's bytes are ignored by the other meters. Contour comes before
#: UltraEasy so that no ACK byte (inside an UltraEasy packet) reaches a Contour meter that
#: has just sent ENQ (that ACK would start a transfer).
PROBE_ORDER = ("onetouch-ultra2", "contour-astm", "onetouch-ultraeasy")
PROBE_TIMEOUT = 0.6


def is_pen(protocol: str) -> bool:
    return protocol in PENS


def is_ble(protocol: str) -> bool:
    return protocol in BLE


def driver_module(protocol: str) -> ModuleType:
    try:
        name = PROTOCOLS[protocol]
    except KeyError:
        raise UnknownProtocol(f"unknown meter protocol {protocol!r}; known: {', '.join(PROTOCOLS)}") from None
    return importlib.import_module(name)


def open_device(protocol: str, url: str, *, timeout: float | None = None) -> MeterDriver:
    """Open ``url`` with the meter driver for ``protocol`` (raises PortError if it cannot be opened)."""
    if protocol not in METERS:
        raise UnknownProtocol(f"not a meter protocol: {protocol!r}; meters: {', '.join(METERS)}")
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
