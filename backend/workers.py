"""``serve --workers N``: N ingest worker processes on one MQTT 5 shared subscription, kept alive.

Why processes: verifying Ed25519 signatures and decoding CBOR in Python holds the GIL, so one
process verifies on one core. Each worker is ``glucoagent-backend ingest-worker --slot K``: its own
connection (client id ``backend-ingest-K``), subscribed to ``$share/ingest/gluco/v1/dev/+/telemetry``
and ``.../health``, so the broker deals every message to one of them.

What holds when a worker dies (mosquitto 2.0.11, measured in tests/system/test_ingest_workers.py):
the broker does NOT hand the QoS 1 messages in flight to a dead shared subscriber to the others. It
keeps them in that subscriber's session, and a clean-start session would drop them. So a worker's
session is kept (``WORKER_SESSION_S``), it sends each PUBACK only after the commit and the signed
ack (manual ack), and this supervisor restarts a dead worker at once under the same client id: the
broker then redelivers what it had in flight and what was queued for it meanwhile. Beyond that the
box resends whatever stays unacknowledged (``mqtt.ack_timeout_s``), and the (device, stream, seq)
key makes every redelivery a duplicate that is stored once and acknowledged.

Provisioning, status and command results stay with the one ``control`` connection in ``serve``:
status is a per-device sequence (online/offline) whose order must not be split across processes,
and certificate issue and revocation write the fleet CA's files (serials, CRL) and reload the broker,
which wants a single writer. Telemetry and health are independent per record, so they scale out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
WORKER_PREFIX = "backend-ingest-"  # the broker's rule for the backend identity: backend-<anything>
# Seconds the broker keeps a dead worker's session (its in-flight and queued messages). Long enough for
# a restart by the supervisor or of `serve`; short, because the broker goes on dealing a kept session of
# a worker that never returns (e.g. after `--workers` was lowered) its share until the session expires.
WORKER_SESSION_S = 120
RESTART_DELAY_S = 0.5
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def worker_client_id(slot: int) -> str:
    return f"{WORKER_PREFIX}{slot}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: a worker is SIGKILLed when `serve` dies, so none outlives it holding the share group."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerPool:
    """Starts ``count`` ingest workers and restarts any that exits before ``stop()``."""

    def __init__(self, count: int, home: Path, host: str, port: int, log_level: str, cloud: str = "glucoagent") -> None:
        self.count = count
        self.argv = [
            sys.executable, "-m", "backend.cli", "ingest-worker",
            "--home", str(home), "--host", host, "--port", str(port), "--log-level", log_level, "--cloud", cloud,
        ]  # fmt: skip
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts = 0

    def _start(self, slot: int) -> None:
        proc = subprocess.Popen([*self.argv, "--slot", str(slot)], preexec_fn=_die_with_parent)
        self.procs[slot] = proc
        log.info("ingest worker %d started (pid %d)", slot, proc.pid)

    def run(self, stop: threading.Event) -> None:
        for slot in range(1, self.count + 1):
            self._start(slot)
        while not stop.wait(RESTART_DELAY_S):
            for slot, proc in list(self.procs.items()):
                rc = proc.poll()
                if rc is not None:
                    log.error("ingest worker %d (pid %d) exited with %d: restarting it", slot, proc.pid, rc)
                    self.restarts += 1
                    self._start(slot)
        self.stop()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
