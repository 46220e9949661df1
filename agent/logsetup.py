"""Logging to syslog on the box (procd/logd collect it) and to stderr elsewhere."""

from __future__ import annotations

import logging
import os

SYSLOG_SOCKET = "/dev/log"


def setup_logging(level: str = "info", target: str = "auto") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    use_syslog = target == "syslog" or (target == "auto" and os.path.exists(SYSLOG_SOCKET) and not os.isatty(2))
    if use_syslog:
        # with pickle, ~0.3 MiB resident: only where syslog is the target (docs/field.md)
        from logging.handlers import SysLogHandler

        handler: logging.Handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("glucoagent[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)
