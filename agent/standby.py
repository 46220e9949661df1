"""`glucoagent run` before the daemon can start: wait, idle, for a usable configuration and credentials.

procd starts the agent as soon as the package is installed, usually before anyone provisioned the
box, and again whenever the configuration changes. An agent that exited there ("not provisioned",
or a line it cannot parse) would be respawned by procd every 5 s for ever (``respawn 3600 5 0``:
retry 0 never gives up), each start a Python start-up and a log line. A finite respawn limit
would instead leave a box provisioned an hour later dead until someone restarts it. So the agent
stays up: it logs why it cannot start once, then checks every ``POLL_S`` seconds whether the
configuration file or the credential files changed (``os.stat`` of a few files: microseconds of
CPU, no inotify needed) and tries again only then; a reason already logged is not repeated.
``glucoagent provision`` writes the
credentials; the next check sees them and the daemon starts, nobody restarts anything.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from agent.config import Config
from agent.errors import GlucoagentError, NotProvisioned
from agent.identity import renewal
from agent.identity.credentials import CA_FILE, CERT_FILE, COMMAND_KEY_FILE, DEVICE_FILE, KEY_FILE, load_identity

log = logging.getLogger(__name__)
POLL_S = 2.0  # a provisioned box starts at most this late; each check costs a handful of stat() calls
CREDENTIAL_FILES = (KEY_FILE, CERT_FILE, CA_FILE, COMMAND_KEY_FILE, DEVICE_FILE)

Fingerprint = tuple[tuple[int, int, int] | None, ...]


def fingerprint(paths: list[Path]) -> Fingerprint:
    """What changes when any of ``paths`` is created, replaced, edited or removed."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def watched_paths(config_path: Path | None, state_dir: Path) -> list[Path]:
    """The configuration file, the state directory (a rename into it changes its mtime) and the credentials."""
    paths = [config_path] if config_path is not None else []
    return [*paths, state_dir, *(state_dir / name for name in CREDENTIAL_FILES)]


def check_ready(cfg: Config) -> None:
    """Raise what would stop the daemon from starting: missing or unreadable credentials."""
    if (renewal.renew_dir(cfg.agent.state_dir) / renewal.COMMIT).exists():
        return  # a certificate swap a crash cut short: the daemon finishes it before loading the identity
    load_identity(cfg.agent.state_dir)


def wait_until_ready(
    config_path: Path | None,
    load: Callable[[], Config],
    stop: threading.Event,
    *,
    default_state_dir: Path,
    poll_s: float = POLL_S,
) -> Config | None:
    """The configuration once it loads and the box is provisioned; None when ``stop`` was set first."""
    state_dir = default_state_dir
    said = ""  # the last reason logged: provisioning writes five files, one "not provisioned" is enough
    while not stop.is_set():
        # Taken before the attempt: a change while it runs is seen by the next comparison.
        tried = watched_paths(config_path, state_dir)
        before = fingerprint(tried)
        try:
            cfg = load()
            state_dir = cfg.agent.state_dir
            check_ready(cfg)
            return cfg
        except NotProvisioned as exc:
            if str(exc) != said:
                log.warning("%s; waiting: the agent starts by itself once provisioned", exc)
            said = str(exc)
        except GlucoagentError as exc:
            if str(exc) != said:
                log.error("cannot start: %s; waiting for the configuration or credentials to change", exc)
            said = str(exc)
        paths = watched_paths(config_path, state_dir)
        if paths != tried:  # the configuration moved the state directory: watch the new one from now
            before = fingerprint(paths)
        while fingerprint(paths) == before:
            if stop.wait(poll_s):
                return None
        log.debug("configuration or credentials changed: trying again")
    return None
