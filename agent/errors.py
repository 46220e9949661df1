"""The agent's exception hierarchy (the drivers have their own root: drivers/errors.py).

Each class carries its CLI exit code; ``agent.cli.dispatch`` turns one into one line on stderr,
never a traceback. A leaf: it imports nothing of the project, so the wire and the cloud may import it. Retrying is decided where retrying is the job
(the uplink's reconnect backoff, the renewal schedule), not by a flag on the error class.
"""

from __future__ import annotations


class GlucoagentError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code: int = 1


# --- storage -------------------------------------------------------------------------------------
class StoreError(GlucoagentError):
    """The local buffer could not do what was asked."""

    exit_code = 30


class BufferFull(StoreError):
    """Intake refused: the buffer is at its configured limit. ``accepted``: what was stored before it filled."""

    def __init__(self, message: str, accepted: list[int] | None = None) -> None:
        self.accepted = accepted or []
        super().__init__(message)


class StorageUnavailable(StoreError):
    """Disk full, read-only file system or an I/O error: the write did not happen."""


class StoreCorrupt(StoreError):
    """The database file failed its integrity check."""


# --- network -------------------------------------------------------------------------------------
class LinkError(GlucoagentError):
    """The MQTT link failed."""

    exit_code = 40


class BrokerUnreachable(LinkError):
    exit_code = 41


class DnsError(LinkError):
    exit_code = 42


class TlsError(LinkError):
    """TLS handshake failed: wrong CA, bad certificate, host name mismatch."""

    exit_code = 43


class ClockNotSet(TlsError):
    """A certificate is not yet valid by our clock: the clock is wrong, not the certificate."""

    exit_code = 44


class LinkTimeout(LinkError):
    exit_code = 45


class NotAuthorized(LinkError):
    """The broker refused our identity (CONNACK not authorised / bad credentials)."""

    exit_code = 46


# --- provisioning ---------------------------------------------------------------------------------
class ProvisioningError(GlucoagentError):
    exit_code = 50


class TokenRejected(ProvisioningError):
    """The backend refused the enrollment token: unknown, already used or expired."""

    exit_code = 51


class NotProvisioned(ProvisioningError):
    exit_code = 52


# --- config, crypto, commands -----------------------------------------------------------------------
class ConfigError(GlucoagentError):
    """Configuration is wrong; the message names the key (and line, for UCI files)."""

    exit_code = 10


class SignatureError(GlucoagentError):
    """A COSE message is malformed or its signature does not verify."""

    exit_code = 60


class CommandRejected(GlucoagentError):
    """A cloud command failed validation; ``code`` is reported back in the result."""

    exit_code = 70

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)
