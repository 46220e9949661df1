"""The last log lines in memory for the ``diagnostics`` command, redacted as they are recorded."""

from __future__ import annotations

import collections
import logging
import re

LOG_RING_LINES = 500
LOG_LINE_MAX = 300

_PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.DOTALL)
_SECRET_RE = re.compile(r"(?i)\b(token|patient|password|secret|private[_ ]?key)(\s*[=:]\s*|\s+)\S+")


def redact(line: str) -> str:
    """No key material, token or patient reference leaves the box in a log excerpt."""
    line = _PEM_RE.sub("[redacted PEM]", line)
    return _SECRET_RE.sub(r"\1\2[redacted]", line)[:LOG_LINE_MAX]


class LogRing(logging.Handler):
    """The last log lines, in memory only (no flash writes), redacted as they are recorded."""

    def __init__(self, capacity: int = LOG_RING_LINES) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(redact(self.format(record)))
        except Exception:  # a logging handler must never raise
            self.handleError(record)

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:]
