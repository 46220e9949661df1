"""The meter watcher survives any error a read raises: one bad port must never end intake."""

from __future__ import annotations

import termios
import threading
from pathlib import Path

from agent.clock import Clock
from agent.config import AgentSection, Config, DevicePort
from agent.meters import MeterWatcher


class _Flaky(MeterWatcher):
    """The first read fails as a vanished pty does in tcflush (termios.error, not an OSError)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, recorder=None, clock=Clock(), on_stored=lambda: None)  # type: ignore[arg-type]
        self.reads = 0
        self.second = threading.Event()

    def read_port(self, port: DevicePort) -> int:
        self.reads += 1
        if self.reads == 1:
            raise termios.error(5, "Input/output error")
        self.second.set()
        return 0


def test_unexpected_exception_from_a_read_does_not_kill_the_watcher(tmp_path: Path) -> None:
    port = tmp_path / "ttyPEN"
    port.touch()
    cfg = Config(
        agent=AgentSection(state_dir=tmp_path, port_scan_s=0.2),
        ports=(DevicePort(name="pen1", port=str(port), protocol="novopen"),),
    )
    watcher = _Flaky(cfg)
    watcher.ports[str(port)].failures = 0
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        # After the failure the port is retried with backoff (5 s for the first failure).
        assert watcher.second.wait(15), "the watcher thread died on termios.error"
        assert thread.is_alive()
        assert watcher.serial_errors == 1
    finally:
        watcher.stop()
        thread.join(timeout=5)
