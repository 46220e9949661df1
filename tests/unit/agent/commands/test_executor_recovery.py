"""What the box reports after a crash, for every command and every crash point, without processes.

A real executor on a real SQLite buffer and real state files in tmp_path, driven through its
narrow seams (a fake daemon implementing ``Host``, a fake uplink implementing ``Link``). A crash is
a BaseException raised at the crash point: nothing after it runs, no cleanup; then the buffer is
closed (as the kernel would) and a new executor recovers from the same files. What it will deliver
is what waits in its results outbox.

Crash points: ``before_start`` (acknowledged to the broker, journal not yet written),
``after_start`` (journal *started*, the handler not yet run), ``after_effect`` (the handler did its
work, no result yet), ``after_result`` (result in the outbox and the journal, never published).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.buffer.store import Store, open_store
from agent.clock import Clock
from agent.commands import executor as executor_mod
from agent.commands import handlers as handlers_mod
from agent.commands import renewals as renewals_mod
from agent.commands.executor import CommandExecutor
from agent.commands.handlers import HANDLERS
from agent.commands.ports import Context, Outcome
from agent.config import Config, load_config
from agent.fsutil import atomic_write
from agent.identity.credentials import KEY_FILE, DeviceIdentity, generate_key, key_pem
from agent.identity.renewal import RenewalSchedule
from agent.identity.signer import Signer
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.update import install as install_mod
from agent.wire import cose
from agent.wire.command import COMMANDS, Command, encode_command
from agent.wire.result import decode_result
from agent.wire.topics import DeviceTopics

DEV = "gd-0123456789ab"
CLOUD = ed25519.Ed25519PrivateKey.generate()
POINTS = ("before_start", "after_start", "after_effect", "after_result")
ARGS: dict[str, dict[str, Any]] = {
    "ping": {},
    "sync_time": {"time": 1_900_000_000},
    "set_config": {"key": "alerts.hypo_mgdl", "value": "80"},
    "read_now": {},
    "resend": {"first": 1, "last": 3},
    "renew_certificate": {},
    "diagnostics": {"lines": 5},
    "deprovision": {"force": True},
    "reboot": {},
    "update": {"manifest": b"not checked: this box has no release key"},
}

# (command, crash point) -> (status, code) of every result the box delivers for the command, in order;
# how many times its handler ran to the end (before and after the restart); and whether the agent
# stops to wipe itself.
R_PONG, R_INT = ("ok", "pong"), ("failed", "interrupted")
EXPECTED: dict[tuple[str, str], tuple[list[tuple[str, str]], int, bool]] = {
    ("ping", "before_start"): ([R_PONG], 1, False),
    ("ping", "after_start"): ([R_PONG], 1, False),  # idempotent: run once more
    ("ping", "after_effect"): ([R_PONG], 2, False),
    ("ping", "after_result"): ([R_PONG], 1, False),
    ("sync_time", "before_start"): ([("ok", "time_set")], 1, False),
    ("sync_time", "after_start"): ([R_INT], 0, False),  # a stale time is worse than none
    ("sync_time", "after_effect"): ([R_INT], 1, False),
    ("sync_time", "after_result"): ([("ok", "time_set")], 1, False),
    ("set_config", "before_start"): ([("ok", "applied")], 1, False),
    ("set_config", "after_start"): ([("ok", "applied")], 1, False),
    ("set_config", "after_effect"): ([("ok", "applied")], 2, False),
    ("set_config", "after_result"): ([("ok", "applied")], 1, False),
    ("read_now", "before_start"): ([("ok", "scheduled")], 1, False),
    ("read_now", "after_start"): ([("ok", "scheduled")], 1, False),
    ("read_now", "after_effect"): ([("ok", "scheduled")], 2, False),
    ("read_now", "after_result"): ([("ok", "scheduled")], 1, False),
    ("resend", "before_start"): ([("failed", "not_retained")], 1, False),
    ("resend", "after_start"): ([("failed", "not_retained")], 1, False),
    ("resend", "after_effect"): ([("failed", "not_retained")], 2, False),
    ("resend", "after_result"): ([("failed", "not_retained")], 1, False),
    ("diagnostics", "before_start"): ([("ok", "snapshot")], 1, False),
    ("diagnostics", "after_start"): ([("ok", "snapshot")], 1, False),
    ("diagnostics", "after_effect"): ([("ok", "snapshot")], 2, False),
    ("diagnostics", "after_result"): ([("ok", "snapshot")], 1, False),
    # No cloud answers here: a renewal that runs times out (its CSR went out first, pending).
    ("renew_certificate", "before_start"): ([("pending", "csr"), ("failed", "renewal_timeout")], 1, False),
    ("renew_certificate", "after_start"): ([R_INT], 0, False),  # the live key is the old one
    ("renew_certificate", "after_effect"): ([("ok", "renewed")], 1, False),  # the live key changed: swapped
    ("renew_certificate", "after_result"): ([("pending", "csr"), ("failed", "renewal_timeout")], 1, False),
    ("deprovision", "before_start"): ([("ok", "deprovisioned")], 1, True),
    ("deprovision", "after_start"): ([R_INT], 0, False),  # no mark: nothing was wiped, nothing will be
    ("deprovision", "after_effect"): ([("ok", "deprovisioned")], 1, True),  # the mark commits the wipe
    ("deprovision", "after_result"): ([("ok", "deprovisioned")], 1, True),
    # The fake box never goes down: a reboot that runs reports no_reboot; one cut off is taken as done.
    ("reboot", "before_start"): ([("failed", "no_reboot")], 1, False),
    ("reboot", "after_start"): ([("ok", "rebooted")], 0, False),
    ("reboot", "after_effect"): ([("ok", "rebooted")], 1, False),
    ("reboot", "after_result"): ([("failed", "no_reboot")], 1, False),
    # No release key pinned: refused before anything changes. Cut off after the install (the effect: the
    # package database holds the new version, the marker's deadline passed, no ack since): the gate fails and
    # the result is left to the version the watchdog reinstalls (it reports the rollback), so none yet.
    ("update", "before_start"): ([("refused", "no_release_key")], 0, False),
    ("update", "after_start"): ([R_INT], 0, False),  # no pending marker: nothing was installed
    ("update", "after_effect"): ([], 1, False),
    ("update", "after_result"): ([("refused", "no_release_key")], 0, False),
}


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the executor catches it)."""


class FakeHost:
    """The daemon as the executor sees it (agent/commands/ports.py ``Host``)."""

    def __init__(self, cfg: Config, signer: Signer) -> None:
        self.cfg = cfg
        self.signer = signer
        self.applied: list[Config] = []
        self.stop_requested = False
        self.reads = 0

    def apply_config(self, cfg: Config) -> None:
        self.applied.append(cfg)
        self.cfg = cfg

    def swap_signer(self, signer: Signer) -> None:
        self.signer = signer

    def request_stop(self) -> None:
        self.stop_requested = True

    def health_sample(self) -> dict[str, str | int | float | bool]:
        return {"uptime_s": 1.0}

    def read_meters_now(self) -> int:
        self.reads += 1
        return 1

    def meter_ports(self) -> list[dict[str, Any]]:
        return []


class FakeLink:
    """The uplink, never connected: results stay in the outbox (agent/commands/ports.py ``Link``)."""

    def __init__(self, state: Path) -> None:
        self.topics = DeviceTopics(DEV)
        self.settings = LinkSettings("127.0.0.1", 1, DEV, TlsFiles(state / "ca", state / "crt", state / "key"))
        self.link: MqttLink | None = None
        self.ticks: list[Any] = []

    @property
    def connected(self) -> bool:
        return False

    def wake(self) -> None:
        pass

    def add_tick(self, work: Any) -> None:
        self.ticks.append(work)

    def stats(self) -> dict[str, object]:
        return {"connected": False}


@dataclasses.dataclass
class Box:
    state: Path
    cfg: Config
    key: ed25519.Ed25519PrivateKey
    store: Store | None = None
    host: FakeHost | None = None
    ex: CommandExecutor | None = None

    def start(self) -> CommandExecutor:
        """A start of the agent on the files as they are (the buffer reopened, the key read from disk)."""
        from agent.identity.credentials import load_key

        key = load_key(self.state / KEY_FILE)
        kid = cose.key_id(key.public_key())
        identity = DeviceIdentity(self.state, DEV, "mqtts://127.0.0.1:1", key, kid, CLOUD.public_key(), {})
        self.store, _ = open_store(self.cfg.buffer_path, max_records=1000, retention_s=3600)
        self.host = FakeHost(self.cfg, Signer(DEV, key, kid, Clock()))
        schedule = RenewalSchedule(time.time() + 365 * 86_400, 30 * 86_400)
        self.ex = CommandExecutor(self.host, FakeLink(self.state), self.store, Clock(), identity, schedule)
        return self.ex

    def crash(self) -> None:
        assert self.ex is not None and self.store is not None
        logging.getLogger().removeHandler(self.ex.ring)
        self.store.close()  # the kernel closes a dead process's files

    def delivered(self, cmd_id: str) -> list[tuple[str, str]]:
        """(status, code) of each result waiting in the outbox for ``cmd_id``, each verified."""
        assert self.ex is not None
        keys = [load_pub(self.state), *self.old_keys]

        def key_for(kid: bytes | None) -> Any:
            return next((k for k in keys if cose.key_id(k) == kid), None)

        out = []
        for rid, payload in self.ex.outbox.waiting():
            result = decode_result(payload, key_for, DEV)
            if rid == cmd_id:
                out.append((result.status, result.code))
        return out

    old_keys: list[Any] = dataclasses.field(default_factory=list)


def load_pub(state: Path) -> Any:
    from agent.identity.credentials import load_key

    return load_key(state / KEY_FILE).public_key()


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    state = tmp_path / "state"
    state.mkdir()
    key = generate_key("ed25519")
    atomic_write(state / KEY_FILE, key_pem(key), mode=0o600)
    conf = tmp_path / "glucoagent"
    conf.write_text(
        "config agent 'agent'\n"
        f"\toption state_dir '{state}'\n"
        "\toption settime_command 'true {epoch}'\n"
        "\toption reboot_command 'true'\n"
        "config update 'update'\n"
        f"\toption status_file '{state}/opkg-status'\n"
        "config alerts 'alerts'\n"
        "\toption hypo_mgdl '70'\n"
    )
    monkeypatch.setattr(renewals_mod, "RENEW_TIMEOUT_S", 0.2)
    monkeypatch.setattr(handlers_mod, "REBOOT_GRACE_S", 0.05)
    monkeypatch.setattr(executor_mod, "DELIVER_BEFORE_WIPE_S", 0.0)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    b = Box(state, load_config(conf), key)
    yield b
    if b.ex is not None:
        logging.getLogger().removeHandler(b.ex.ring)
    if b.store is not None:
        b.store.close()


def envelope(ctype: str, cmd_id: str) -> bytes:
    now = int(time.time())
    return encode_command(CLOUD, cmd_id, DEV, ctype, ARGS[ctype], issued_at=now - 5, expires_at=now + 600)


def swap_key(state: Path) -> None:
    """What a committed renewal leaves: another key in place (agent/identity/renewal.py ``commit``)."""
    atomic_write(state / KEY_FILE, key_pem(generate_key("ed25519")), mode=0o600)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("ctype", sorted(COMMANDS))
def test_what_the_box_reports_after_a_crash(box: Box, monkeypatch: pytest.MonkeyPatch, ctype: str, point: str) -> None:
    runs: Counter[str] = Counter()
    real = HANDLERS[ctype]

    def counted(ctx: Context, cmd: Command, received: float) -> Outcome | None:
        outcome = real.run(ctx, cmd, received)
        runs[ctype] += 1
        return outcome

    def crash_first(ctx: Context, cmd: Command, received: float) -> Outcome | None:
        raise Crash

    def crash_after(ctx: Context, cmd: Command, received: float) -> Outcome | None:
        if ctype == "renew_certificate":  # the effect without a cloud: the old kid noted, the swap committed
            atomic_write(ctx.state_dir / "commands" / "pending" / f"{cmd.id}.kid", ctx.host.signer.kid.hex().encode())
            box.old_keys.append(box.key.public_key())
            swap_key(box.state)
            runs[ctype] += 1
        elif ctype == "update":  # installed, then the agent stopped before its gate passed
            atomic_write(ctx.state_dir / "opkg-status", b"Package: glucoagent\nVersion: 0.2.0-1\n")
            install_mod.write_marker(
                ctx.state_dir / "update" / install_mod.PENDING_FILE,
                {"NAME": "glucoagent", "FROM": "0.1.0-1", "TO": "0.2.0-1", "PREVIOUS": "-", "DEADLINE": "0"},
            )
            runs[ctype] += 1
        else:
            counted(ctx, cmd, received)
        raise Crash

    crashing = {"after_start": crash_first, "after_effect": crash_after}.get(point, counted)
    monkeypatch.setitem(HANDLERS, ctype, dataclasses.replace(real, run=crashing))
    cmd_id = f"cmd-{ctype.replace('_', '-')}-{point.replace('_', '-')}"
    payload = envelope(ctype, cmd_id)

    ex = box.start()
    if point == "before_start":
        monkeypatch.setattr(ex.journal, "start", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    assert ex.submit(payload)  # durable now: the broker gets its PUBACK
    if point == "after_result":
        ex.work_once()
    else:
        with pytest.raises(Crash):
            ex.work_once()
    box.crash()

    monkeypatch.setitem(HANDLERS, ctype, dataclasses.replace(real, run=counted))
    ex = box.start()
    ex.recover()

    results, expected_runs, wipes = EXPECTED[(ctype, point)]
    assert box.delivered(cmd_id) == results
    if (ctype, point) == ("update", "after_effect"):  # left started; the watchdog rolls back, the next start reports
        assert ex.journal.lookup(cmd_id) is not None and ex.journal.lookup(cmd_id)[0] == "started"  # type: ignore[index]
        report = {"OUTCOME": "rolled_back", "NAME": "glucoagent", "FROM": "0.1.0-1", "TO": "0.2.0-1",
                  "REASON": "gate_timeout", "AT": "1"}  # fmt: skip
        (box.state / "update" / install_mod.PENDING_FILE).unlink()
        install_mod.write_marker(box.state / "update" / install_mod.REPORT_FILE, report)
        box.crash()
        ex = box.start()
        ex.recover()
        results = [("failed", "rolled_back")]
        assert box.delivered(cmd_id) == results
    assert runs[ctype] == expected_runs
    assert box.host is not None and box.host.stop_requested == wipes
    if not wipes:  # the command is settled: journal done, no envelope kept, nothing left in the inbox
        assert ex.journal.lookup(cmd_id) is not None and ex.journal.lookup(cmd_id)[0] == "done"  # type: ignore[index]
        assert not list(ex.pending_dir.iterdir())
        assert not ex.inbox.leftover()
        # A replay is answered from the journal, byte for byte, and runs nothing.
        before = runs[ctype]
        stored = ex.journal.lookup(cmd_id)[1]  # type: ignore[index]
        ex.handle(payload)
        assert ex.outbox.waiting()[-1] == (cmd_id, stored)
        assert runs[ctype] == before


def test_the_table_covers_every_command_and_crash_point() -> None:
    assert set(EXPECTED) == {(c, p) for c in COMMANDS for p in POINTS}


def test_a_crash_mid_config_change_leaves_the_file_and_the_running_config_agreeing(
    box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_config re-run after the crash: the option is in the file and applied through the Host, once more."""
    real = HANDLERS["set_config"]

    def crash_after(ctx: Context, cmd: Command, received: float) -> Outcome | None:
        real.run(ctx, cmd, received)
        raise Crash

    monkeypatch.setitem(HANDLERS, "set_config", dataclasses.replace(real, run=crash_after))
    ex = box.start()
    ex.submit(envelope("set_config", "cmd-config-0001"))
    with pytest.raises(Crash):
        ex.work_once()
    box.crash()
    monkeypatch.setitem(HANDLERS, "set_config", real)
    box.start().recover()
    assert "option hypo_mgdl '80'" in Path(box.cfg.source).read_text()
    assert box.host is not None and [c.alerts.hypo_mgdl for c in box.host.applied] == [80]
