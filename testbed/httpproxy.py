"""A real HTTP proxy for tests: Debian's tinyproxy 1.11 as a child process on 127.0.0.1.

``Tinyproxy(run_dir, connect_ports=(8883,), basic_auth=("user", "password"))`` writes a config
(``ConnectPort`` lines: only those ports may be tunnelled, others get 403; ``BasicAuth``: 407 without
the right credentials) and runs ``tinyproxy -d -c CONF`` in the foreground; ``kill()`` is a SIGKILL,
which drops every tunnel at once (tinyproxy serves each connection on a thread of the one process).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"


def find_tinyproxy() -> str:
    found = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").exists() else None)
    if not found:
        raise RuntimeError("tinyproxy not found: run `make setup` (apt-get install tinyproxy)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Tinyproxy:
    def __init__(
        self,
        run_dir: Path,
        *,
        connect_ports: Sequence[int] = (),
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        """``connect_ports`` empty: tinyproxy tunnels to any port."""
        self.run_dir = run_dir
        self.connect_ports = tuple(connect_ports)
        self.basic_auth = basic_auth
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        user = f"{self.basic_auth[0]}@" if self.basic_auth else ""
        return f"http://{user}{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "tinyproxy.log"

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            f"Listen {LOOPBACK}",
            "Timeout 600",
            "MaxClients 64",
            "LogLevel Info",
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        if self.basic_auth:
            lines.append(f"BasicAuth {self.basic_auth[0]} {self.basic_auth[1]}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port()
        conf = self.run_dir / "tinyproxy.conf"
        conf.write_text(self._config())
        conf.chmod(0o600)  # it holds the BasicAuth password
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [find_tinyproxy(), "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self._proc.returncode}: {self.log_path.read_text()[-1000:]}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"tinyproxy did not listen on {self.port} within 10s")

    def _signal(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: every tunnel through it breaks at once."""
        self._signal(signal.SIGKILL)

    def __enter__(self) -> Tinyproxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
