"""The meter watcher tells driver outcomes apart by class, over real ptys: a pen reader with no pen in
its field is nothing wrong; a meter that does not answer is a counted serial error, never the catch-all."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from agent.clock import Clock
from agent.config import AgentSection, Config, DevicePort
from agent.meters import MeterWatcher
from drivers.simulators.novopen import Capture, serve
from drivers.simulators.pty_link import PtyLink


def _watcher(tmp_path: Path, port: Path, protocol: str) -> MeterWatcher:
    cfg = Config(
        agent=AgentSection(state_dir=tmp_path / "state", port_scan_s=0.2),
        ports=(DevicePort(name="dev1", port=str(port), protocol=protocol),),
    )
    # No recorder: neither outcome gets as far as storing anything.
    return MeterWatcher(cfg, recorder=None, clock=Clock(), on_stored=lambda: None)  # type: ignore[arg-type]


def test_no_pen_on_the_reader_is_not_a_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    link = tmp_path / "ttyPEN"
    stop = threading.Event()
    with PtyLink(link) as pty:
        thread = threading.Thread(target=serve, args=(pty, Capture(())), kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        try:
            watcher = _watcher(tmp_path, link, "novopen")
            state = watcher.ports[str(link)]
            state.pen_read = True  # a pen was on the reader: "no pen" now means it was taken away
            with caplog.at_level(logging.DEBUG, logger="agent.meters"):
                watcher._scan(state)
        finally:
            stop.set()
            thread.join(5)
    assert (state.failures, state.pen_read, watcher.serial_errors) == (0, False, 0)
    assert any("no pen" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_a_silent_meter_is_a_counted_serial_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with PtyLink(tmp_path / "ttyMETER") as pty:
        watcher = _watcher(tmp_path, pty.link, "onetouch-ultra2")
        state = watcher.ports[str(pty.link)]
        with caplog.at_level(logging.WARNING, logger="agent.meters"):
            watcher._scan(state)
    assert (state.failures, watcher.serial_errors) == (1, 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None  # the driver's error, not the catch-all
