"""The ten commands (docs/commands.md), one function each, and ``HANDLERS``: each with what a crash
in the middle of it means at the next start. The command types are the wire's (``COMMANDS``)."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.buffer.store import CLINICAL
from agent.commands.logring import redact
from agent.commands.ports import INTERRUPTED, Context, Handler, Interruption, Outcome
from agent.config import SCHEMA, SETTABLE_KEYS, build_config
from agent.errors import CommandRejected, ConfigError, GlucoagentError
from agent.fsutil import atomic_write
from agent.uci import parse_uci, set_option
from agent.wire.command import COMMANDS, Command

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger(__name__)

SCRIPT_TIMEOUT_S = 120.0
REBOOT_GRACE_S = 60.0  # the reboot command returned 0: the box should go down within this

# Options applied to the running agent; any other settable option is persisted and needs a restart.
HOT_OPTIONS = frozenset(
    {
        "agent.log_level",
        "agent.health_interval_s",
        "agent.port_scan_s",
        "agent.reread_s",
        "agent.link",  # the uplink reads it at every pass and while asleep (at least once a minute)
        "agent.wake_interval_s",
        "mqtt.batch_records",
        "mqtt.inflight",
        "mqtt.max_payload",
        "mqtt.ack_timeout_s",
        "mqtt.stable_s",
        "buffer.max_records",
        "buffer.retention_s",
        "alerts.hypo_mgdl",
        "alerts.severe_hypo_mgdl",
        "alerts.hyper_mgdl",
    }
)


def ping(ctx: Context, _cmd: Command, _received: float) -> Outcome:
    data = {"agent": __version__, "clock": ctx.clock.quality().value, "connected": ctx.link.connected}
    return Outcome("ok", "pong", "agent running", data)


def sync_time(ctx: Context, cmd: Command, received: float) -> Outcome:
    epoch = float(cmd.args["time"]) + (time.monotonic() - received)  # time spent queued on the box
    before = time.time()
    argv = shlex.split(ctx.host.cfg.agent.settime_command.replace("{epoch}", str(int(epoch))))
    proc = _run_script(argv)
    if proc.returncode != 0:
        return Outcome("failed", "settime_failed", f"{argv[0]} exited {proc.returncode}: {_tail(proc)}")
    ctx.clock.trusted = True
    return Outcome(
        "ok", "time_set", f"clock set to {int(epoch)}", {"time": int(epoch), "offset_s": round(epoch - before, 3)}
    )


def set_config(ctx: Context, cmd: Command, _received: float) -> Outcome:
    key, value = str(cmd.args["key"]), str(cmd.args["value"])
    if key not in SETTABLE_KEYS:
        raise CommandRejected("not_settable", f"{key} cannot be set remotely")
    section, option = key.split(".", 1)
    try:
        parsed = SCHEMA[section][option](value)
    except ValueError as exc:
        raise CommandRejected("bad_value", f"{key}: {exc}") from None
    cfg = ctx.host.cfg
    path = Path(cfg.source)
    if not path.is_file():
        return Outcome("failed", "no_config_file", "the agent runs without a configuration file to persist to")
    text = path.read_text(encoding="utf-8")
    try:
        new_text = set_option(text, section, option, value, source=str(path), create_type=section)
        build_config(parse_uci(new_text, source=str(path)), str(path))  # the whole file must stay valid
    except ConfigError as exc:
        raise CommandRejected("bad_value", str(exc)) from None
    atomic_write(path, new_text.encode("utf-8"), mode=path.stat().st_mode & 0o777)
    if key not in HOT_OPTIONS:
        return Outcome(
            "ok", "restart_required", f"{key} saved; it takes effect after a restart", {"restart_required": True}
        )
    # Only the option itself changes in the running configuration.
    new_section = dataclasses.replace(getattr(cfg, section), **{option: parsed})
    ctx.host.apply_config(dataclasses.replace(cfg, **{section: new_section}))
    return Outcome("ok", "applied", f"{key} saved and applied", {"restart_required": False})


def read_now(ctx: Context, _cmd: Command, _received: float) -> Outcome:
    present = ctx.host.read_meters_now()
    return Outcome("ok", "scheduled", f"read requested on {present} attached port(s)", {"ports": present})


def resend(ctx: Context, cmd: Command, _received: float) -> Outcome:
    first, last = int(cmd.args["first"]), int(cmd.args["last"])
    n = ctx.store.requeue(CLINICAL, first, last)
    if n:
        ctx.link.wake()
        return Outcome("ok", "requeued", f"{n} record(s) {first}..{last} queued for upload again", {"requeued": n})
    if ctx.store.retained(CLINICAL, first, last, 1):
        return Outcome(
            "ok", "already_pending", f"records {first}..{last} are still waiting for upload", {"requeued": 0}
        )
    return Outcome("failed", "not_retained", f"no record {first}..{last} is kept on the box any more", {"requeued": 0})


def diagnostics(ctx: Context, cmd: Command, _received: float) -> Outcome:
    lines = int(cmd.args.get("lines", 50))
    up = ctx.link.stats()
    data = {
        "agent": __version__,
        "health": ctx.host.health_sample(),
        "uplink": {k: v for k, v in up.items() if isinstance(v, int | float | bool) or v is None},
        "conditions": sorted(ctx.store.conditions()),
        "ports": ctx.host.meter_ports(),
        "log": ctx.ring.tail(lines),
    }
    return Outcome("ok", "snapshot", f"health snapshot and the last {len(data['log'])} log line(s)", data)


def deprovision(ctx: Context, cmd: Command, _received: float) -> Outcome:
    unsent = ctx.store.stats().pending_clinical
    if unsent and not cmd.args.get("force", False):
        return Outcome(
            "failed", "unsent_readings", f"{unsent} readings are not uploaded yet; refusing (force=true wipes them)"
        )
    atomic_write(ctx.deprovision_mark, b"wipe\n")  # from here on the wipe happens, even after a crash
    return _deprovisioned(unsent)


def _deprovisioned(unsent: int | None) -> Outcome:
    data = {} if unsent is None else {"wiped_unsent": unsent}
    return Outcome("ok", "deprovisioned", "key, certificate and buffer will be wiped; the agent stops", data)


def deprovision_check(ctx: Context, _cmd_id: str) -> Outcome:
    """The mark is the commit point: with it the wipe goes ahead, without it nothing was wiped."""
    return _deprovisioned(None) if ctx.deprovision_mark.exists() else INTERRUPTED


def reboot(ctx: Context, _cmd: Command, _received: float) -> Outcome | None:
    argv = shlex.split(ctx.host.cfg.agent.reboot_command)
    proc = _run_script(argv)
    if proc.returncode != 0:
        return Outcome("failed", "reboot_failed", f"{argv[0]} exited {proc.returncode}: {_tail(proc)}")
    log.warning("reboot command accepted; waiting for the box to go down")
    if ctx.stopping.wait(REBOOT_GRACE_S):
        return None  # going down: the next start reports it
    return Outcome(
        "failed", "no_reboot", f"{argv[0]} returned but the box did not restart within {REBOOT_GRACE_S:.0f}s"
    )


def reboot_check(_ctx: Context, _cmd_id: str) -> Outcome:
    return Outcome("ok", "rebooted", "the box restarted")


def renew_certificate(ctx: Context, cmd: Command, _received: float) -> Outcome:
    return ctx.renew(cmd)


def renew_check(ctx: Context, cmd_id: str) -> Outcome:
    """A different live key than the one the renewal started with proves the swap happened."""
    if ctx.renewed_at_start or ctx.key_changed_since(cmd_id):
        return Outcome("ok", "renewed", "new key and certificate in place")
    return INTERRUPTED


def update(ctx: Context, cmd: Command, received: float) -> Outcome | None:
    from agent.update import command  # loaded when an update comes, not held at steady state (docs/field.md)

    return command.run(ctx, cmd, received)


def update_check(ctx: Context, cmd_id: str) -> Outcome | None:
    from agent.update import command  # as update()

    return command.check(ctx, cmd_id)


# Not sync_time among the re-run: after a crash (maybe a reboot) the box cannot know how long ago
# the cloud's time was taken, and setting a stale time marked "synced" is worse.
HANDLERS: dict[str, Handler] = {
    "ping": Handler(ping, Interruption.RERUN),
    "sync_time": Handler(sync_time, Interruption.REPORT),
    "set_config": Handler(set_config, Interruption.RERUN),
    "read_now": Handler(read_now, Interruption.RERUN),
    "resend": Handler(resend, Interruption.RERUN),
    "renew_certificate": Handler(renew_certificate, Interruption.CHECK, renew_check),
    "diagnostics": Handler(diagnostics, Interruption.RERUN),
    "deprovision": Handler(deprovision, Interruption.CHECK, deprovision_check, stops_agent=True),
    "reboot": Handler(reboot, Interruption.CHECK, reboot_check),
    "update": Handler(update, Interruption.CHECK, update_check),
}
if set(HANDLERS) != set(COMMANDS):  # the wire's table is the one list of commands
    raise RuntimeError(f"command handlers {sorted(HANDLERS)} differ from the wire's {sorted(COMMANDS)}")


def _run_script(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    import subprocess  # only sync_time and reboot run a program: not held at steady state (docs/field.md)

    try:
        return subprocess.run(argv, capture_output=True, timeout=SCRIPT_TIMEOUT_S, check=False)
    except subprocess.SubprocessError as exc:  # a timeout: the executor reports it as the command's failure
        raise GlucoagentError(str(exc)) from exc


def _tail(proc: subprocess.CompletedProcess[bytes]) -> str:
    return redact((proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip()[-200:])
