"""Run one meter simulator on a pty published at a symlink, until stopped or SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.errors import ConfigError
from agent.models import GlucoseReading
from drivers.simulators.base import DEFAULT_BAUD, Simulator
from drivers.simulators.faults import NO_FAULTS, Faults
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
    raise ConfigError(f"simulate: unknown protocol {protocol!r} (onetouch-ultra2, contour-astm, onetouch-ultraeasy)")


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
    with PtyLink(link) as pty, _stop_on_signals(stop):
        make_simulator(
            protocol, pty, records, faults, baud=baud, serial=serial, clock_skew_s=clock_skew_s, stop_event=stop
        ).serve()


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
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


def link_path(value: str) -> Path:
    path = Path(value)
    if not path.parent.is_dir():
        raise ConfigError(f"simulate --link: directory {path.parent} does not exist")
    return path
