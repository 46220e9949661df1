"""`glucoagent status` and `glucoagent check`: what a technician needs to see, read-only."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from agent.buffer.store import Store
from agent.clock import CLOCK_FLOOR, Clock
from agent.config import Config, Endpoint
from agent.errors import GlucoagentError, StoreError
from agent.identity.credentials import is_provisioned, load_identity
from agent.link.probe import check_routes
from agent.link.proxy import proxy_from_config
from agent.link.routes import device_link_settings, link_routes
from agent.snapshot import read_snapshot

SNAPSHOT_EVERY_S = 2.0  # how often the daemon publishes its state (agent/snapshot.py)
STORE_KEYS = ("buffer_depth", "buffer_health_samples", "oldest_unsent_age_s", "last_upload_ack", "next_seq",
              "conditions", "meters")


def store_state(store: Store) -> dict[str, Any]:
    """The buffer's part of the status: computed by the daemon for its snapshot, or here when it is stopped."""
    st = store.stats()
    return {
        "buffer_depth": st.pending_clinical,
        "buffer_health_samples": st.pending - st.pending_clinical,
        "oldest_unsent_age_s": round(time.time() - st.oldest_pending_at) if st.oldest_pending_at else None,
        "last_upload_ack": st.last_ack,
        "next_seq": st.next_seq,
        "conditions": {c: msg for c, (_since, msg) in store.conditions().items()},
        "meters": [
            {"source": s, "protocol": p, "port": port, "last_seen": seen, "last_read_complete": ok}
            for s, p, port, seen, ok in store.sources()
        ],
    }


def collect_status(cfg: Config) -> dict[str, Any]:
    out = _collect(cfg)
    if cfg.ble:  # the device list is a small JSON file: reading it imports no Bluetooth stack
        from agent.ble_source import load_devices, source_name

        seen = {m["source"]: m["last_seen"] for m in out.get("meters", [])}
        out["ble_devices"] = [
            {**dev, "address": addr, "last_contact": seen.get(source_name(dev["kind"], addr))}
            for addr, dev in sorted(load_devices(cfg.agent.state_dir).items())
        ]
    return out


def _collect(cfg: Config) -> dict[str, Any]:
    state = cfg.agent.state_dir
    out: dict[str, Any] = {"provisioned": is_provisioned(state), "state_dir": str(state)}
    out["clock"] = Clock().quality().value
    if out["provisioned"]:
        ident = load_identity(state)
        out["device_id"] = ident.device_id
        out["broker"] = cfg.mqtt.endpoint or ident.endpoint
    live = read_snapshot(cfg.run_path, max_age_s=SNAPSHOT_EVERY_S * 5)
    out["running"] = live is not None
    if live is not None:  # the daemon holds the buffer exclusively: use what it published
        out["connected"] = bool(live.get("connected"))
        out.update({k: live[k] for k in STORE_KEYS if k in live})
        return out
    out["connected"] = False
    if cfg.buffer_path.exists():
        try:
            store = Store(cfg.buffer_path, max_records=cfg.buffer.max_records, busy_timeout_s=0.5)
        except StoreError:
            # Locked: a daemon is starting and has not published its first snapshot yet.
            live = _wait_for_snapshot(cfg, SNAPSHOT_EVERY_S * 3)
            if live is None:
                raise
            out.update(running=True, connected=bool(live.get("connected")))
            out.update({k: live[k] for k in STORE_KEYS if k in live})
            return out
        try:
            out.update(store_state(store))
        finally:
            store.close()
    else:
        out.update(buffer_depth=0, oldest_unsent_age_s=None, conditions={}, meters=[])
    return out


def _wait_for_snapshot(cfg: Config, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = read_snapshot(cfg.run_path, max_age_s=SNAPSHOT_EVERY_S * 5)
        if live is not None:
            return live
        time.sleep(0.1)
    return None


def format_status(st: dict[str, Any]) -> str:
    def ts(v: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v)) + " UTC" if v else "never"

    lines = [
        f"provisioned:    {'yes' if st['provisioned'] else 'no'}",
        f"device id:      {st.get('device_id', '-')}",
        f"broker:         {st.get('broker', '-')}",
        f"connected:      {'yes' if st['connected'] else 'no'}",
        f"last upload:    {ts(st.get('last_upload_ack'))}",
        f"buffer depth:   {st['buffer_depth']} unsent"
        + (f", oldest {st['oldest_unsent_age_s']} s" if st.get("oldest_unsent_age_s") is not None else ""),
        f"clock:          {st['clock']}",
    ]
    for m in st.get("meters", []):
        lines.append(
            f"meter:          {m['source']} on {m['port']}, last seen {ts(m['last_seen'])}"
            + ("" if m["last_read_complete"] else " (last read incomplete)")
        )
    for d in st.get("ble_devices", []):
        name = f" {d['name']!r}" if d.get("name") else ""
        lines.append(
            f"bonded:         {d['address']}{name} ({d['kind']}, via {d['radio']}), last contact {ts(d['last_contact'])}"
        )
    for code, msg in st.get("conditions", {}).items():
        lines.append(f"ALERT {code}: {msg}")
    return "\n".join(lines)


def status_json(st: dict[str, Any]) -> str:
    return json.dumps(st, indent=2, sort_keys=True)


def run_checks(cfg: Config, out: Any = print) -> int:
    """Self-test; prints one line per check and returns the exit code of the first failure (0 if none)."""
    first_failure = 0

    def report(name: str, ok: bool, detail: str, code: int = 1) -> None:
        nonlocal first_failure
        out(f"{'ok    ' if ok else 'FAILED'} {name}: {detail}")
        if not ok and not first_failure:
            first_failure = code

    now = time.time()
    report(
        "clock",
        now >= CLOCK_FLOOR.timestamp(),
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
        + ("" if now >= CLOCK_FLOOR.timestamp() else " is before 2025: set the time"),
        44,
    )
    for p in cfg.ports:
        present = os.path.exists(p.port)
        access = present and os.access(p.port, os.R_OK | os.W_OK)
        report(f"serial port {p.name}", bool(access), p.port + ("" if access else " missing or not accessible"), 20)
    state = cfg.agent.state_dir
    if not is_provisioned(state):
        report("provisioned", False, f"no credentials in {state}: run `glucoagent provision`", 52)
        return first_failure
    ident = load_identity(state)
    ep = Endpoint.parse(cfg.mqtt.endpoint or ident.endpoint)
    try:
        proxy = proxy_from_config(cfg.mqtt.proxy, cfg.mqtt.proxy_password_file, state)
    except GlucoagentError as exc:
        report("proxy", False, str(exc), exc.exit_code)
        return first_failure
    profile = cfg.mqtt.cloud()
    base = dataclasses.replace(
        device_link_settings(
            profile, ident, ep, protocol=cfg.mqtt.protocol, connect_timeout_s=cfg.mqtt.connect_timeout_s,
            server_ca=cfg.mqtt.server_ca_path(state),
        ),
        will=None,
    )
    # A cloud with one connection per device (Azure) would drop the agent's link for a login beside it:
    # check then stops after the TLS handshake (docs/clouds.md).
    login = base.side("check") if profile.side_connections else None
    routes = link_routes(cfg.mqtt, ep, login or base, proxy)
    check_routes(routes, cfg.mqtt.connect_timeout_s, report, lambda line: out(f"warn   {line}"), login=login is not None)
    return first_failure


