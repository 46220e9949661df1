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


# --- Bluetooth LE (drivers/ble/, docs/ble.md): each its own message and exit code --------------------
class BleError(DriverError):
    """A Bluetooth LE controller or health device did not do what the host asked."""


class ControllerAbsent(BleError):
    """The HCI controller's serial port is missing or cannot be opened."""

    exit_code = 21


class ControllerNotResponding(BleError):
    """The port opened but no HCI controller answered (wrong device, wrong baud, hung firmware)."""

    exit_code = 22


class DeviceOutOfRange(BleError):
    """The device was not seen advertising (switched off, asleep, out of range) or the link was lost."""

    exit_code = 23


class PairingRefused(BleError):
    """The device refused pairing or bonding (not in pairing mode, unsupported method)."""

    exit_code = 24


class WrongPasskey(PairingRefused):
    """Pairing failed on the passkey check: the passkey entered is not the one the device showed."""

    exit_code = 25


class NotBonded(BleError):
    """Reading was asked of a device this box has no bond with (pair it first)."""

    exit_code = 26


class ProfileMissing(BleError):
    """The device does not offer the GATT service or characteristic the profile requires."""

    exit_code = 27


class RecordAccessError(BleError):
    """The meter answered a Record Access Control Point request with an error, or not in time."""

    exit_code = 28
