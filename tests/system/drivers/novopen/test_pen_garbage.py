"""Arbitrary bytes at each layer: typed errors only, never a crash or a hang."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import DriverError
from drivers.novopen import Device
from drivers.simulators.pty_link import PtyLink


@settings(max_examples=12, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=120), min_size=1, max_size=20))
def test_driver_against_a_reader_spewing_garbage(
    tmp_path_factory: pytest.TempPathFactory, garbage: list[bytes]
) -> None:
    """A port answering every write with arbitrary bytes: the read ends in a DriverError, quickly."""
    link = Path(tmp_path_factory.mktemp("garbage")) / "port"
    stop = threading.Event()
    with PtyLink(link) as pty:

        def spew() -> None:
            n = 0
            while not stop.is_set():
                if pty.read(timeout=0.02):
                    pty.write(garbage[n % len(garbage)])
                    n += 1

        thread = threading.Thread(target=spew, daemon=True)
        thread.start()
        try:
            with Device(str(link), ack_timeout=0.05, response_timeout=0.1, retries=2, pen_wait_s=0.2) as device:
                device.read_pen()
        except DriverError:
            pass
        finally:
            stop.set()
            thread.join(2)
