"""The running daemon's state, published as a small JSON file in RAM for `glucoagent status`.

The buffer is opened with ``locking_mode=EXCLUSIVE`` (WAL without shared memory,
which JFFS2 cannot map), so no other process can read it while the daemon runs.
The daemon writes this snapshot every few seconds to ``run_dir`` (tmpfs on the
box: no flash wear); `status` uses it when it is fresh, the database otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

SNAPSHOT = "status.json"


def write_snapshot(run_dir: Path, state: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{SNAPSHOT}.{os.getpid()}"
    tmp.write_text(json.dumps({**state, "written_at": time.time(), "pid": os.getpid()}, sort_keys=True))
    os.replace(tmp, run_dir / SNAPSHOT)


def read_snapshot(run_dir: Path, max_age_s: float) -> dict[str, Any] | None:
    """The daemon's snapshot if it is fresh and its writer is alive, else None."""
    path = run_dir / SNAPSHOT
    try:
        data = json.loads(path.read_text())
        # Age by the file's mtime, stamped by the kernel: comparable with our own clock even when the
        # writer's idea of the time differs (it is what a clock jump between two writes looks like).
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or abs(age) > max_age_s:
        return None
    with contextlib.suppress(OSError, TypeError, ValueError):
        os.kill(int(data["pid"]), 0)
        return data
    return None


def clear_snapshot(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / SNAPSHOT).unlink()
