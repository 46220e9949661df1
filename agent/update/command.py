"""The ``update`` command (docs/updates.md): check, download, keep, install, restart; at the next start the gate.

Arguments: ``manifest`` (the signed release manifest, bytes) and, for a box that has no kept package file
of the version it runs (its first update), ``previous`` (the signed manifest of the running version: it is
downloaded first, so a rollback target exists before anything changes).

Run: everything is checked before the package manager runs (release signature, package name, the version
ordering against the running version: a downgrade only when the manifest allows it, so a replayed old
``update`` under a new id cannot take the box back; a replayed id is the journal's). After a successful
install the agent stops (procd starts the new version) and the result is left to the next start, where
``check`` runs the health gate or reports the watchdog's rollback.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from agent.commands.ports import INTERRUPTED, Context, Outcome
from agent.config import UpdateSection
from agent.errors import CommandRejected
from agent.update.fetch import FetchPolicy, download
from agent.update.install import (
    INSTALL_TIMEOUT_S,
    KEPT_DIR,
    PENDING_FILE,
    gate_passed,
    hand_to_watchdog,
    install,
    installer_started,
    keep,
    kept_name,
    prune_kept,
    take_report,
    wait_for_installer,
)
from agent.update.keys import load_release_key
from agent.update.outcome import record
from agent.update.pkgdb import PackageManager, installed_version, read_marker, write_marker
from agent.update.staging import UPDATE_DIR, Staging, UpdateFailed
from agent.wire.command import Command
from agent.wire.release import Manifest, check_applicable, decode_manifest

log = logging.getLogger(__name__)

GATE_FILE = "gate"  # what a new version that failed its gate saw (no_connection, no_ack), for the report


def _pm(cfg: UpdateSection) -> PackageManager:
    return PackageManager.parse(cfg.install_command, cfg.status_file)


def _fetch(ctx: Context, m: Manifest, cfg: UpdateSection) -> Path:
    policy = FetchPolicy(chunk_timeout_s=cfg.chunk_timeout_s, reserve_bytes=cfg.reserve_bytes)
    path = download(ctx.state_dir, ctx.link.settings, ctx.link.topics, m, policy, ctx.stopping)
    kept = keep(ctx.state_dir, path, m)
    Staging.discard(ctx.state_dir)  # the kept copy is the one used from here on
    return kept


def run(ctx: Context, cmd: Command, received: float) -> Outcome | None:
    """The command; its end (refused, failed, or the install done and the agent stopping) is also kept as the
    box's last update outcome for the health samples (agent/update/outcome.py)."""
    seen: list[Manifest] = []  # the manifest, once its signature verified: names the version refused
    try:
        outcome = _run(ctx, cmd, seen)
    except CommandRejected as exc:
        to = seen[0].version if seen else ""
        record(ctx.state_dir, "refused", from_version=_running_or_blank(ctx), to_version=to, reason=exc.code)
        raise
    if outcome is not None:
        _record(ctx, outcome)
    return outcome


def _running_or_blank(ctx: Context) -> str:
    cfg = ctx.host.cfg.update
    return installed_version(_pm(cfg).status_file, cfg.package) or ""


def _record(ctx: Context, outcome: Outcome) -> None:
    data = outcome.data or {}
    if outcome.code in ("updated", "rolled_back"):
        kind = "kept" if outcome.code == "updated" else "rolled_back"
    else:
        kind = "refused" if outcome.status == "refused" else "failed"
    record(
        ctx.state_dir,
        kind,
        from_version=str(data.get("from", "")),
        to_version=str(data.get("to", "")),
        reason=str(data.get("reason", outcome.code)),
    )


def _run(ctx: Context, cmd: Command, seen: list[Manifest]) -> Outcome | None:
    cfg = ctx.host.cfg.update
    pm = _pm(cfg)
    key = load_release_key(ctx.state_dir)
    m = decode_manifest(cmd.args["manifest"], key)
    seen.append(m)
    if m.name != cfg.package:
        raise CommandRejected("wrong_package", f"this box updates {cfg.package}, not {m.name}")
    running = installed_version(pm.status_file, m.name)
    if running is None:
        raise CommandRejected("not_installed", f"{m.name} is not in the package database {pm.status_file}")
    check_applicable(m, running)
    if m.format != pm.format:  # an .ipk handed to apk (or the reverse) would fail only after the download
        raise CommandRejected("wrong_format", f"this box installs {pm.format} packages, not {m.format}")
    previous = (
        ctx.state_dir
        / UPDATE_DIR
        / KEPT_DIR
        / kept_name(Manifest(m.name, running, m.format, 1, bytes(32), "0", False, 0))
    )
    try:
        if not previous.is_file():
            if "previous" not in cmd.args:
                raise CommandRejected(
                    "no_rollback_target", f"no package file of the running {running} is kept: send its manifest"
                )
            prev = decode_manifest(cmd.args["previous"], key)
            if (prev.name, prev.version, prev.format) != (m.name, running, m.format):
                raise CommandRejected("bad_previous", f"previous is {prev.name} {prev.version}, the box runs {running}")
            previous = _fetch(ctx, prev, cfg)
        package = _fetch(ctx, m, cfg)
        prune_kept(ctx.state_dir, {previous.name, package.name})  # before: the install may never return here
        install(ctx.state_dir, pm, package, m, running=running, previous=previous, gate_s=cfg.gate_s)
    except UpdateFailed as exc:
        return Outcome("failed", exc.code, str(exc), {"from": running, "to": m.version})
    log.warning("update: %s %s installed over %s; restarting for its health gate", m.name, m.version, running)
    ctx.host.request_stop()  # procd starts the new version; the next start gives the result
    return None


def check(ctx: Context, cmd_id: str) -> Outcome | None:
    """The next start after an ``update`` was cut off (or restarted the agent on purpose). None: the result is
    left to a later start (the gate did not pass; the watchdog's rollback will be reported by the version it
    reinstalls)."""
    outcome = _check(ctx, cmd_id)
    if outcome is not None:
        _record(ctx, outcome)
    return outcome


def _check(ctx: Context, _cmd_id: str) -> Outcome | None:
    cfg = ctx.host.cfg.update
    report = take_report(ctx.state_dir)
    if report is not None:
        data = {k.lower(): report.get(k, "") for k in ("FROM", "TO", "REASON")}
        gate = read_marker(ctx.state_dir / UPDATE_DIR / GATE_FILE) or {}
        (ctx.state_dir / UPDATE_DIR / GATE_FILE).unlink(missing_ok=True)
        if gate.get("TO") == data["to"] and gate.get("GATE"):
            data["gate"] = gate["GATE"]  # what the new version saw; absent when it never got that far
        why = "did not pass its health gate" if data["reason"] == "gate_timeout" else f"failed ({data['reason']})"
        return Outcome("failed", "rolled_back", f"{data['to']} {why}; {data['from']} reinstalled", data)
    if not wait_for_installer(ctx.state_dir):
        log.error("update: the package manager still runs after %.0fs; reading its database anyway", INSTALL_TIMEOUT_S)
    marker = read_marker(ctx.state_dir / UPDATE_DIR / PENDING_FILE)
    if marker is None:
        return INTERRUPTED  # stopped while downloading or checking: nothing changed (the download resumes)
    running = installed_version(_pm(cfg).status_file, marker.get("NAME", cfg.package))
    data = {"from": marker.get("FROM", ""), "to": marker.get("TO", "")}
    if running != data["to"] and installer_started(ctx.state_dir):
        # The package manager was cut off (a power loss): files of either version may be on disk. The
        # watchdog reinstalls the previous package; the start after that reports the rollback.
        if hand_to_watchdog(ctx.state_dir, "install_interrupted"):
            log.error("update: the install of %s was cut off; the watchdog reinstalls %s", data["to"], running)
        return None
    if running != data["to"]:
        (ctx.state_dir / UPDATE_DIR / PENDING_FILE).unlink(missing_ok=True)
        return Outcome("failed", "interrupted", f"cut off before {data['to']} was installed; {running} runs", data)
    return _gate(ctx, marker, data)


def _gate(ctx: Context, marker: dict[str, str], data: dict[str, str]) -> Outcome | None:
    """Healthy: this start opened the buffer (the executor runs), connected with its certificate and got an
    end-to-end ack from the cloud (the uplink's acked counter) before the marker's deadline.

    Not healthy in time (or stopped first): None, the command stays *started*. What this start saw is noted
    (``GATE_FILE``: ``no_connection`` or ``no_ack``) for the result the previous version gives once the
    watchdog has reinstalled it; a stop before the deadline leaves the gate to the next start."""
    deadline = float(marker.get("DEADLINE", "0") or 0)
    connected = False
    while time.time() < deadline and not ctx.stopping.is_set():
        stats = ctx.link.stats()
        connected = connected or bool(stats.get("connected"))
        acked = stats.get("acked", 0)
        if isinstance(acked, int) and acked > 0:
            if gate_passed(ctx.state_dir, data["to"]):
                return Outcome("ok", "updated", f"{data['to']} passed its health gate (replaced {data['from']})", data)
            break
        ctx.stopping.wait(0.2)
    if time.time() >= deadline:
        seen = "no_ack" if connected else "no_connection"
        with contextlib.suppress(OSError, ValueError):
            write_marker(ctx.state_dir / UPDATE_DIR / GATE_FILE, {"TO": data["to"], "GATE": seen})
        log.error("update: %s did not pass its health gate (%s); the watchdog reinstalls %s", data["to"], seen,
                  data["from"])  # fmt: skip
    return None
