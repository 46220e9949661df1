"""What every meter driver is, and the serial transport they share.

A driver module (``drivers/<meter>.py``) exports ``Device(SerialTransport, MeterDriver)``
and a ``PROTOCOL`` name. Codecs live in the same module as pure functions over
bytes; only ``Device`` touches the port.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import logging
import termios
from collections.abc import Iterator
from typing import ClassVar

import serial

from drivers.errors import PortError
from drivers.models import GlucoseReading, MeterIdentity

log = logging.getLogger(__name__)
# termios.error is not an OSError: pyserial lets it through when the device vanishes mid-call.
_PORT_ERRORS = (serial.SerialException, OSError, termios.error)


class SerialTransport:
    """Owns one serial port, opened through ``serial_for_url`` so tests can pass a pty or ``loop://``."""

    BAUDRATE: ClassVar[int] = 9600
    PARITY: ClassVar[str] = serial.PARITY_NONE
    TIMEOUT: ClassVar[float] = 1.0

    def __init__(self, url: str, *, timeout: float | None = None) -> None:
        self.url = url
        try:
            self.port = serial.serial_for_url(
                url,
                baudrate=self.BAUDRATE,
                parity=self.PARITY,
                bytesize=serial.EIGHTBITS,
                stopbits=serial.STOPBITS_ONE,
                timeout=self.TIMEOUT if timeout is None else timeout,
                xonxoff=False,
                rtscts=False,
                dsrdtr=False,
            )
        except (*_PORT_ERRORS, ValueError) as exc:
            raise PortError(f"cannot open {url}: {exc}") from exc

    def close(self) -> None:
        try:
            self.port.close()
        except _PORT_ERRORS:
            log.debug("closing %s failed", self.url, exc_info=True)

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except _PORT_ERRORS as exc:
            raise PortError(f"write to {self.url} failed: {exc}") from exc

    def read(self, size: int) -> bytes:
        try:
            return bytes(self.port.read(size))
        except _PORT_ERRORS as exc:
            raise PortError(f"read from {self.url} failed: {exc}") from exc

    def readline(self) -> bytes:
        try:
            return bytes(self.port.readline())
        except _PORT_ERRORS as exc:
            raise PortError(f"read from {self.url} failed: {exc}") from exc

    def flush_input(self) -> None:
        try:
            self.port.reset_input_buffer()
        except _PORT_ERRORS as exc:
            raise PortError(f"flush of {self.url} failed: {exc}") from exc

    def waiting(self) -> int:
        """Bytes received and not yet read."""
        try:
            return int(self.port.in_waiting)
        except _PORT_ERRORS as exc:
            raise PortError(f"read from {self.url} failed: {exc}") from exc

    @contextlib.contextmanager
    def read_timeout(self, seconds: float) -> Iterator[None]:
        """Another read timeout for the body; the port's own is restored after.

        Setting a timeout reconfigures the port, which fails once the device is gone. A failure
        while restoring must not replace the error that ended the body (the driver's own, e.g.
        the read that found the port vanished), so it is only logged then."""
        normal = self.port.timeout
        try:
            self.port.timeout = seconds
        except _PORT_ERRORS as exc:
            raise PortError(f"cannot set the timeout of {self.url}: {exc}") from exc
        try:
            yield
        except BaseException:
            try:
                self.port.timeout = normal
            except _PORT_ERRORS:
                log.debug("restoring the timeout of %s failed", self.url, exc_info=True)
            raise
        try:
            self.port.timeout = normal
        except _PORT_ERRORS as exc:
            raise PortError(f"cannot restore the timeout of {self.url}: {exc}") from exc

    def __enter__(self) -> SerialTransport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class MeterDriver(abc.ABC):
    """The read-only operations the agent needs from a glucose meter.

    No method may erase or change meter memory.
    """

    PROTOCOL: ClassVar[str]

    @abc.abstractmethod
    def identify(self) -> MeterIdentity: ...

    @abc.abstractmethod
    def read_clock(self) -> dt.datetime:
        """The meter's clock as naive local time."""

    @abc.abstractmethod
    def read_records(self) -> Iterator[GlucoseReading]:
        """Yield every stored record whose integrity verified, newest first.

        May raise ``DriverError`` part-way; records already yielded stay valid.
        """
