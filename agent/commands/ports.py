"""What the command executor needs of the rest of the agent, as narrow interfaces, and the shapes it
shares with its handlers (``Outcome``, ``Handler``, ``Interruption``).

The executor never sets a daemon attribute: it asks the daemon (``Host``) to apply a configuration,
swap the signer or stop, and the daemon does it on its own terms. ``Link`` is the little of the
uplink it uses. Both are seams: the unit tests drive a real executor with fakes of these two.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.buffer.store import Store
from agent.clock import Clock
from agent.config import Config
from agent.identity.credentials import DeviceIdentity
from agent.identity.signer import Signer
from agent.link.mqtt import LinkSettings, MqttLink
from agent.wire.command import Command
from agent.wire.topics import DeviceTopics

if TYPE_CHECKING:
    from agent.commands.logring import LogRing


class Host(Protocol):
    """The daemon, as the executor sees it (agent/daemon.py ``Daemon`` implements it)."""

    @property
    def cfg(self) -> Config: ...

    @property
    def signer(self) -> Signer: ...

    def apply_config(self, cfg: Config) -> None:
        """Run with ``cfg`` from now on (on the daemon's own thread); returns once it is applied."""

    def swap_signer(self, signer: Signer) -> None:
        """Sign every new record and result with ``signer`` (key and kid change together)."""

    def request_stop(self) -> None:
        """Stop the agent as a signal would."""

    def health_sample(self) -> dict[str, str | int | float | bool]: ...

    def read_meters_now(self) -> int:
        """Read every attached meter now; returns how many ports have one attached."""

    def meter_ports(self) -> list[dict[str, Any]]: ...


class Link(Protocol):
    """The uplink, as the executor sees it (agent/link/uplink.py ``Uplink`` implements it)."""

    topics: DeviceTopics
    settings: LinkSettings
    link: MqttLink | None

    @property
    def connected(self) -> bool: ...

    def wake(self) -> None: ...

    def send(self, kind: str, payload: bytes, message_id: str = "") -> int:
        """Publish a message of ``kind`` where the cloud profile puts it (agent/wire/profiles.py); the mid."""

    def add_tick(self, work: Callable[[], None]) -> None: ...

    def stats(self) -> dict[str, object]: ...

    parked: threading.Event  # set while held down (``hold``): the device's one connection is free

    def hold(self) -> None:
        """Take the link down and keep it down (a renewal on a one-connection cloud) until ``release``."""

    def release(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # ok | failed | refused | pending
    code: str
    message: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


INTERRUPTED = Outcome("failed", "interrupted", "the agent stopped while it ran")


class Interruption(enum.Enum):
    """What a command cut off by a crash or stop (journal *started*, no result) means at the next start."""

    RERUN = "rerun"  # idempotent: run once more from its kept envelope, unless it expired meanwhile
    REPORT = "report"  # reported failed, code ``interrupted``
    CHECK = "check"  # the live state tells: the handler's ``check`` gives the outcome


@dataclasses.dataclass(slots=True)
class Context:
    """What a handler may touch: the parts of the agent, and the executor's few services."""

    host: Host
    link: Link
    store: Store
    clock: Clock
    identity: DeviceIdentity
    state_dir: Path
    ring: LogRing
    stopping: threading.Event  # set when the agent stops
    deprovision_mark: Path
    renewed_at_start: bool  # the daemon completed a committed certificate swap before this start
    renew: Callable[[Command], Outcome]  # the certificate exchange (agent/commands/renewals.py)
    key_changed_since: Callable[[str], bool]  # the live key is not the one a renewal started with


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """One command type: how it runs, and what an interruption means for it.

    ``run`` returns the outcome, or None when the result is left to the next start (a reboot under way).
    ``check`` is asked at the next start when ``interrupted`` is CHECK. ``stops_agent``: once the result
    is out (or after DELIVER_BEFORE_WIPE_S), the agent stops and wipes its identity (deprovision).
    """

    run: Callable[[Context, Command, float], Outcome | None]
    interrupted: Interruption
    check: Callable[[Context, str], Outcome | None] | None = None  # None: still undecided, left started
    stops_agent: bool = False
