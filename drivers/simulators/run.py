"""Run one simulated meter or pen reader on a pty published at a symlink, until stopped or SIGTERM.

The library under ``glucoagent simulate`` (drivers/cli.py); tests and the bench call it directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence

from drivers.errors import UnknownProtocol
from drivers.models import GlucoseReading
from drivers.registry import METERS
from drivers.simulators.base import DEFAULT_BAUD, Simulator
from drivers.simulators.faults import NO_FAULTS, Faults
from drivers.simulators.novopen import NO_FAULTS as PEN_NO_FAULTS
from drivers.simulators.novopen import Capture, PenFaults, PenLog, SimStats
from drivers.simulators.novopen import serve as serve_novopen
from drivers.simulators.pty_link import PtyLink

log = logging.getLogger(__name__)


def simulator_class(protocol: str) -> type[Simulator]:
    if protocol == "onetouch-ultra2":
        from drivers.simulators.onetouch_ultra2 import Ultra2Simulator

        return Ultra2Simulator
    if protocol == "contour-astm":
        from drivers.simulators.contour_astm import ContourSimulator

        return ContourSimulator
    if protocol == "onetouch-ultraeasy":
        from drivers.simulators.onetouch_ultraeasy import UltraEasySimulator

        return UltraEasySimulator
    raise UnknownProtocol(f"simulate: no meter simulator for {protocol!r} ({', '.join(METERS)})")


def make_simulator(
    protocol: str,
    link: PtyLink,
    records: Sequence[GlucoseReading],
    faults: Faults = NO_FAULTS,
    *,
    baud: float | None = DEFAULT_BAUD,
    serial: str | None = None,
    clock_skew_s: float = 0.0,
    stop_event: threading.Event | None = None,
) -> Simulator:
    cls = simulator_class(protocol)
    return cls(link, records, faults, baud=baud, serial=serial, clock_skew_s=clock_skew_s, stop_event=stop_event)


def serve(
    protocol: str,
    link: str | os.PathLike[str],
    records: Sequence[GlucoseReading],
    faults: Faults = NO_FAULTS,
    stop_event: threading.Event | None = None,
    *,
    baud: float | None = DEFAULT_BAUD,
    serial: str | None = None,
    clock_skew_s: float = 0.0,
) -> None:
    """Serve ``records`` (newest first) as a ``protocol`` meter on a pty linked at ``link``.

    Returns when ``stop_event`` is set, on SIGTERM/SIGINT (main thread only) or when the
    fault plan unplugs the cable. The symlink is removed on return.
    """
    stop = stop_event or threading.Event()
    simulator_class(protocol)  # fail before creating the link
    with PtyLink(link) as pty, stop_on_signals(stop):
        make_simulator(
            protocol, pty, records, faults, baud=baud, serial=serial, clock_skew_s=clock_skew_s, stop_event=stop
        ).serve()


def serve_pen(
    link: str | os.PathLike[str],
    source: PenLog | Capture,
    faults: PenFaults = PEN_NO_FAULTS,
    stop_event: threading.Event | None = None,
) -> SimStats:
    """Serve a PN532 reader with ``source`` (a generated pen or a captured session) in its field on a pty
    linked at ``link``, until ``stop_event`` is set or SIGTERM/SIGINT (main thread only)."""
    stop = stop_event or threading.Event()
    with PtyLink(link) as pty, stop_on_signals(stop):
        print(f"novopen reader simulator on {link} ({pty.slave_name})", flush=True)
        return serve_novopen(pty, source, faults, stop)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` while the body runs (in the main thread; elsewhere nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
