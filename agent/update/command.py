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

import logging
import time
from pathlib import Path

from agent.commands.ports import INTERRUPTED, Context, Outcome
from agent.config import UpdateSection
from agent.errors import CommandRejected
from agent.update.fetch import FetchPolicy, download
from agent.update.install import (
    KEPT_DIR,
    PENDING_FILE,
    PackageManager,
    gate_passed,
    install,
    installed_version,
    keep,
    kept_name,
    prune_kept,
    read_marker,
    take_report,
)
from agent.update.keys import load_release_key
from agent.update.staging import UPDATE_DIR, Staging, UpdateFailed
from agent.wire.command import Command
from agent.wire.release import Manifest, check_applicable, decode_manifest

log = logging.getLogger(__name__)


def _pm(cfg: UpdateSection) -> PackageManager:
    return PackageManager.parse(cfg.install_command, cfg.status_file)


def _fetch(ctx: Context, m: Manifest, cfg: UpdateSection) -> Path:
    policy = FetchPolicy(chunk_timeout_s=cfg.chunk_timeout_s, reserve_bytes=cfg.reserve_bytes)
    path = download(ctx.state_dir, ctx.link.settings, ctx.link.topics, m, policy, ctx.stopping)
    kept = keep(ctx.state_dir, path, m)
    Staging.discard(ctx.state_dir)  # the kept copy is the one used from here on
    return kept


def run(ctx: Context, cmd: Command, _received: float) -> Outcome | None:
    cfg = ctx.host.cfg.update
    pm = _pm(cfg)
    key = load_release_key(ctx.state_dir)
    m = decode_manifest(cmd.args["manifest"], key)
    if m.name != cfg.package:
        raise CommandRejected("wrong_package", f"this box updates {cfg.package}, not {m.name}")
    running = installed_version(pm.status_file, m.name)
    if running is None:
        raise CommandRejected("not_installed", f"{m.name} is not in the package database {pm.status_file}")
    check_applicable(m, running)
    if m.format != pm.format:  # an .ipk handed to apk (or the reverse) would fail only after the download
        raise CommandRejected("wrong_format", f"this box installs {pm.format} packages, not {m.format}")
    previous = ctx.state_dir / UPDATE_DIR / KEPT_DIR / kept_name(
        Manifest(m.name, running, m.format, 1, bytes(32), "0", False, 0)
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
        install(ctx.state_dir, pm, package, m, running=running, previous=previous, gate_s=cfg.gate_s)
    except UpdateFailed as exc:
        return Outcome("failed", exc.code, str(exc), {"from": running, "to": m.version})
    prune_kept(ctx.state_dir, {previous.name, package.name})
    log.warning("update: %s %s installed over %s; restarting for its health gate", m.name, m.version, running)
    ctx.host.request_stop()  # procd starts the new version; the next start gives the result
    return None


def check(ctx: Context, _cmd_id: str) -> Outcome:
    """The next start after an ``update`` was cut off (or restarted the agent on purpose)."""
    cfg = ctx.host.cfg.update
    report = take_report(ctx.state_dir)
    if report is not None:
        data = {k.lower(): report.get(k, "") for k in ("FROM", "TO", "REASON")}
        return Outcome(
            "failed", "rolled_back", f"{data['to']} did not pass its health gate; {data['from']} reinstalled", data
        )
    marker = read_marker(ctx.state_dir / UPDATE_DIR / PENDING_FILE)
    if marker is None:
        return INTERRUPTED  # stopped while downloading or checking: nothing changed (the download resumes)
    running = installed_version(_pm(cfg).status_file, marker.get("NAME", cfg.package))
    data = {"from": marker.get("FROM", ""), "to": marker.get("TO", "")}
    if running != data["to"]:
        (ctx.state_dir / UPDATE_DIR / PENDING_FILE).unlink(missing_ok=True)
        return Outcome("failed", "interrupted", f"cut off before {data['to']} was installed; {running} runs", data)
    return _gate(ctx, marker, data)


def _gate(ctx: Context, marker: dict[str, str], data: dict[str, str]) -> Outcome:
    """Healthy: this start opened the buffer (the executor runs), connected with its certificate and got an
    end-to-end ack from the cloud (the uplink's acked counter) before the marker's deadline."""
    deadline = float(marker.get("DEADLINE", "0") or 0)
    while time.time() < deadline and not ctx.stopping.is_set():
        if int(ctx.link.stats().get("acked", 0) or 0) > 0:  # type: ignore[call-overload]
            if gate_passed(ctx.state_dir, data["to"]):
                return Outcome("ok", "updated", f"{data['to']} passed its health gate (replaced {data['from']})", data)
            break
        ctx.stopping.wait(0.2)
    return Outcome(
        "failed", "gate_failed", f"{data['to']} got no end-to-end ack in time; the watchdog reinstalls {data['from']}", data
    )
