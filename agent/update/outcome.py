"""The box's running version and its last update outcome, for the health samples (docs/updates.md).

``<state>/update/last`` holds the last outcome as ``KEY=value`` lines (like the marker and the watchdog's
report): ``OUTCOME`` (``kept``: the new version passed its gate; ``rolled_back``: the watchdog reinstalled
the previous one; ``refused``: nothing changed, a check failed; ``failed``: the download or install failed
or was cut off, the running version unchanged), ``FROM``, ``TO``, ``REASON`` (the command's result code)
and ``AT`` (Unix seconds). Every health sample carries it, so the cloud sees each box's version and last
outcome without asking.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from agent import __version__
from agent.update.pkgdb import installed_version, read_marker, write_marker

UPDATE_DIR = "update"  # = agent.update.staging.UPDATE_DIR (not imported: staging is loaded only for an update)

log = logging.getLogger(__name__)

LAST_FILE = "last"
OUTCOMES = frozenset({"kept", "rolled_back", "refused", "failed"})


def record(state_dir: Path, outcome: str, *, from_version: str, to_version: str, reason: str) -> None:
    """Keep the outcome of the update just settled (the previous one is replaced)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown update outcome {outcome!r}")
    fields = {"OUTCOME": outcome, "FROM": from_version, "TO": to_version, "REASON": reason,
              "AT": str(int(time.time()))}  # fmt: skip
    try:
        (state_dir / UPDATE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        write_marker(state_dir / UPDATE_DIR / LAST_FILE, {k: v.replace("\n", " ") for k, v in fields.items()})
    except (OSError, ValueError) as exc:  # the result itself is still reported; only the summary is missing
        log.warning("update: last outcome not recorded: %s", exc)


class VersionProbe:
    """The running package version from the package database, re-read only when the database changed."""

    def __init__(self, status_file: Path, package: str) -> None:
        self.status_file = status_file
        self.package = package
        self._seen: tuple[int, int] | None = None
        self._version = ""

    def version(self) -> str:
        try:
            st = self.status_file.stat()
        except OSError:
            return ""
        if self._seen != (st.st_mtime_ns, st.st_size):
            self._seen = (st.st_mtime_ns, st.st_size)
            self._version = installed_version(self.status_file, self.package) or ""
        return self._version


def health_fields(state_dir: Path, probe: VersionProbe) -> dict[str, str | int]:
    """``agent_version`` (the package version installed; the code's own version when the package database
    does not know it, e.g. run from a checkout) and, once an
    update was settled, ``update_outcome``, ``update_from``, ``update_to``, ``update_reason``, ``update_at``."""
    out: dict[str, str | int] = {"agent_version": probe.version() or __version__}
    last = read_marker(state_dir / UPDATE_DIR / LAST_FILE)
    if last and last.get("OUTCOME") in OUTCOMES:
        out["update_outcome"] = last["OUTCOME"]
        out["update_from"] = last.get("FROM", "")
        out["update_to"] = last.get("TO", "")
        out["update_reason"] = last.get("REASON", "")
        at = last.get("AT", "")
        out["update_at"] = int(at) if at.isdigit() else 0
    return out
