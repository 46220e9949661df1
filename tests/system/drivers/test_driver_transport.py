"""The serial transport on a real pty whose other end goes away (a meter unplugged).

Every pyserial, OS or termios error on the port must reach the driver's caller as ``PortError``,
cleanup included: the agent's meter loop handles driver errors, and anything else ends a read
in a traceback.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers import onetouch_ultra2 as u2
from drivers.base import SerialTransport
from drivers.errors import PortError
from drivers.reader import read_meter
from drivers.simulators.pty_link import PtyLink


@pytest.fixture
def unplugged() -> Iterator[SerialTransport]:
    """A transport whose pty master has been closed: the device vanished."""
    with tempfile.TemporaryDirectory(prefix="gtr") as tmp:
        link = PtyLink(Path(tmp) / "ttyGONE")
        port = SerialTransport(str(link.link), timeout=0.2)
        link.close()
        try:
            yield port
        finally:
            port.close()


@pytest.mark.parametrize(
    "operation",
    [
        lambda p: p.read(10),
        lambda p: p.readline(),
        lambda p: p.flush_input(),
        lambda p: p.waiting(),
        lambda p: p.read_timeout(1.0).__enter__(),
    ],
    ids=["read", "readline", "flush_input", "waiting", "read_timeout"],
)
def test_every_operation_on_a_vanished_port_is_a_port_error(
    unplugged: SerialTransport, operation: Callable[[SerialTransport], object]
) -> None:
    with pytest.raises(PortError):
        operation(unplugged)


def test_close_of_a_vanished_port_does_not_raise(unplugged: SerialTransport) -> None:
    unplugged.close()
    unplugged.close()


def test_restoring_the_timeout_does_not_replace_the_error_that_ended_the_read() -> None:
    """The body's PortError (not the restore's SerialException) is what the caller sees."""
    with tempfile.TemporaryDirectory(prefix="gtr") as tmp:
        link = PtyLink(Path(tmp) / "ttyGOING")
        port = SerialTransport(str(link.link), timeout=0.2)
        try:
            with pytest.raises(PortError, match="read from"), port.read_timeout(0.5):
                link.close()  # unplugged while the longer timeout is in force
                port.readline()
        finally:
            port.close()


def test_ultra2_unplugged_while_waiting_for_the_dump_is_a_port_error(scripted: Any, run_in_thread: Any) -> None:
    """The chaos-run traceback: the Ultra 2 waits for DMP's first line with a longer timeout; the
    meter goes away in that wait; restoring the timeout failed with pyserial's SerialException,
    which replaced the PortError and escaped the driver layer."""
    with u2.Device(scripted.url) as dev:
        future = run_in_thread(lambda: list(dev.read_records()))
        scripted.expect(u2.encode_command(u2.CMD_DUMP))
        scripted.close()
        with pytest.raises(PortError):
            future.result(timeout=20)


def test_read_meter_of_an_ultra2_unplugged_during_the_dump_reports_a_port_error(
    scripted: Any, run_in_thread: Any
) -> None:
    """Through the reader the agent calls: identity and clock answered, then the cable is pulled; the
    read ends as an incomplete read with the port error, not an exception of another layer."""
    future = run_in_thread(read_meter, scripted.url, u2.PROTOCOL, wall_clock=dt.datetime.now)
    scripted.expect(u2.encode_command(u2.CMD_SERIAL))
    scripted.send(u2.encode_line(b'@ "HAXGR4PVY"'))
    scripted.expect(u2.encode_command(u2.CMD_VERSION))
    scripted.send(u2.encode_line(b"?P02.00.00 01/18/08"))
    scripted.expect(u2.encode_command(u2.CMD_CLOCK))
    scripted.send(u2.encode_line(b"F " + u2.format_time(dt.datetime(2026, 1, 6, 10, 11, 12)).encode()))
    scripted.expect(u2.encode_command(u2.CMD_DUMP))
    scripted.close()
    result = future.result(timeout=20)
    assert not result.complete and result.readings == ()
    assert (result.error or "").startswith("PortError: read from")
