"""The drivers' own exception root: what a meter, a pen reader or a driver's inputs did wrong.

``drivers/`` is the ground floor: nothing above it is in reach, so its errors have a root
of their own, not the agent's. Each class carries the exit code a command line gives it (the agent's CLI
dispatch, agent/cli.py, maps every ``DriverError`` to ``exit_code``). Every pyserial or OS error on a port is turned
into a ``PortError`` at the transport (drivers/base.py), cleanup included.
"""

from __future__ import annotations


class DriverError(Exception):
    """A meter or pen reader did not give us what its protocol promises."""

    exit_code: int = 20


class InvalidResponse(DriverError):
    """Bytes arrived but are not a valid frame or line of the protocol."""


class MissingChecksum(InvalidResponse):
    """A line or frame ends before its checksum field."""


class InvalidChecksum(InvalidResponse):
    """The checksum on the wire differs from the one computed over the payload."""

    def __init__(self, wire: int, calculated: int, what: str = "checksum") -> None:
        self.wire = wire
        self.calculated = calculated
        super().__init__(f"invalid {what}: wire 0x{wire:04X}, computed 0x{calculated:04X}")


class MeterNotReady(DriverError):
    """The meter answered but is not in its data mode (e.g. Ultra 2 switched on)."""


class NoResponse(DriverError):
    """Nothing (valid) came back before the timeout: unplugged, wrong protocol, switched on."""


class NoPen(NoResponse):
    """The pen reader answered, but no pen (ISO-DEP target) came into its field before the wait ran out."""


class PortError(DriverError):
    """The serial port could not be opened or vanished (unplugged)."""


# --- a driver's inputs, not a device: a configuration mistake (exit code of a config error) ---------
class DriverUsageError(DriverError):
    """A driver was asked for something it cannot do: an unknown protocol, a bad input file."""

    exit_code = 10


class UnknownProtocol(DriverUsageError):
    """The protocol name is not one of drivers.registry.PROTOCOLS."""


class BadRecordsFile(DriverUsageError):
    """A readings or doses file (docs/readings.md, docs/pen.md) is not valid."""


class InputUnreadable(DriverError):
    """A file given to a driver command (a capture to decode) could not be read: an OS error, not the device's."""

    exit_code = 1
