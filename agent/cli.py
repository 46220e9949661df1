"""`glucoagent`: the device-side command line (provision, status, check, run, ...).

Every expected failure prints one line ``glucoagent: error: ...`` and exits with
the code of its class (agent/errors.py); no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import AgentSection, Config, load_config, with_state_dir
from agent.errors import GlucoagentError
from drivers.cli import add_parsers as add_driver_parsers
from drivers.errors import DriverError

DEFAULT_CONFIG = Path("/etc/config/glucoagent")
log = logging.getLogger("glucoagent")


def _config_path(args: argparse.Namespace) -> Path | None:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return path


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(_config_path(args))
    if args.state_dir is not None:
        cfg = with_state_dir(cfg, args.state_dir)
    return cfg


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.identity.provisioning import ClaimFiles, KeyTypeRefused, provision

    cfg = _config(args)
    if args.key_type == "ed25519" and cfg.mqtt.profile == "aws":  # asked for, so refused, not quietly swapped
        raise KeyTypeRefused(
            "AWS IoT Core takes no Ed25519 device certificate: leave out --key-type (the box makes a P-256 key)"
        )
    claim = ClaimFiles.default(cfg.agent.state_dir)
    claim = ClaimFiles(ca=args.ca or claim.ca, cert=args.claim_cert or claim.cert, key=args.claim_key or claim.key)
    device_id = provision(
        cfg.agent.state_dir,
        args.endpoint,
        args.token,
        args.patient,
        claim=claim,
        key_type=args.key_type or cfg.agent.key_type,
        protocol=cfg.mqtt.protocol,
        timeout_s=args.timeout,
        mqtt=cfg.mqtt,
    )
    print(f"provisioned: device id {device_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status import collect_status, format_status, status_json

    st = collect_status(_config(args))
    print(status_json(st) if args.json else format_status(st))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from agent.status import run_checks

    return run_checks(_config(args))


def cmd_run(args: argparse.Namespace) -> int:
    from agent.logsetup import setup_logging
    from agent.standby import wait_until_ready

    # Unprovisioned or misconfigured: wait idle for a change instead of exiting into procd's
    # respawn loop (agent/standby.py says why). Its errors are logged before any config is read.
    setup_logging(args.log_level or "info")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def load() -> Config:
        cfg = _config(args)
        setup_logging(args.log_level or cfg.agent.log_level, cfg.agent.log_target)
        return cfg

    cfg = wait_until_ready(_config_path(args), load, stop, default_state_dir=args.state_dir or AgentSection().state_dir)
    if cfg is None:
        return 0
    from agent.daemon import Daemon

    daemon = Daemon(cfg)
    if stop.is_set():  # signalled while it was being built: stop at once, cleanly
        daemon.stop()
    return daemon.run()


def cmd_deprovision(args: argparse.Namespace) -> int:
    from agent.buffer.store import Store
    from agent.identity.credentials import is_provisioned
    from agent.identity.wipe import wipe_state
    from agent.snapshot import read_snapshot
    from agent.status import SNAPSHOT_EVERY_S

    cfg = _config(args)
    state = cfg.agent.state_dir
    if read_snapshot(cfg.run_path, max_age_s=SNAPSHOT_EVERY_S * 5) is not None:
        raise GlucoagentError("the agent is running: stop it first (/etc/init.d/glucoagent stop)")
    if cfg.buffer_path.exists() and not args.force:
        store = Store(cfg.buffer_path, max_records=cfg.buffer.max_records, busy_timeout_s=1.0)
        try:
            unsent = store.stats().pending_clinical
        finally:
            store.close()
        if unsent:
            raise GlucoagentError(f"{unsent} readings are not uploaded yet; refusing (use --force to wipe them)")
    if not is_provisioned(state) and not cfg.buffer_path.exists():
        print(f"nothing to wipe in {state}")
        return 0
    wipe_state(cfg)
    print(f"deprovisioned: key, certificate and buffer wiped from {state}")
    return 0


def cmd_hotplug(args: argparse.Namespace) -> int:
    from agent.meters import hotplug_note

    hotplug_note(_config(args).run_path, args.action, args.devname)
    return 0


def _ble_radio(args: argparse.Namespace, name: str | None) -> tuple[Config, str, str]:
    """(config, port, radio name) of the controller ``name``, or of the only one configured."""
    if args.verbose:
        from agent.logsetup import setup_logging

        setup_logging("info")
    else:  # the outcome is the one line this command prints; bumble's warnings (e.g. DTR on a pty) are noise here
        logging.getLogger().addHandler(logging.NullHandler())
    cfg = _config(args)
    radios = [r for r in cfg.ble if name is None or r.name == name]
    if not cfg.ble:
        raise GlucoagentError("no BLE controller configured: add a 'config ble' section with its port (docs/ble.md)")
    if len(radios) != 1:
        names = ", ".join(r.name for r in cfg.ble)
        raise GlucoagentError(f"name the BLE controller with --radio (configured: {names})")
    return cfg, radios[0].port, radios[0].name


def cmd_pair(args: argparse.Namespace) -> int:
    from agent.ble_source import GLUCOSE, keystore_path, remember_device
    from drivers.ble.central import BleCentral

    cfg, port, radio = _ble_radio(args, args.radio)
    central = BleCentral(port, keystore_path(cfg.agent.state_dir), connect_timeout=args.timeout)
    seen = [a for a in central.scan(args.scan) if a.services]
    for a in seen:
        print(f"{a.address}  {a.name or '-':20}  {','.join(a.services):24}  {a.rssi} dBm")
    address = (args.address or "").upper()
    if not address:
        if len(seen) != 1:
            raise GlucoagentError(f"{len(seen)} health devices seen: name the one to pair (glucoagent pair ADDRESS)")
        address = seen[0].address.upper()
    advert = next((a for a in seen if a.address.upper() == address), None)
    kind = advert.services[0] if advert is not None else args.kind
    if kind is None:
        raise GlucoagentError(f"{address} was not seen advertising a health service; give --kind")

    def passkey() -> int:
        if args.passkey is not None:
            return int(args.passkey)
        text = input(f"passkey shown on {address}: ").strip()
        if not text.isdigit():
            raise GlucoagentError("the passkey is the 6-digit number the device shows")
        return int(text)

    central.pair(address, None if args.just_works else passkey)
    remember_device(cfg.agent.state_dir, address, kind, advert.name if advert and advert.name else "", radio)
    print(f"paired: {address} ({kind if kind != GLUCOSE else 'glucose meter'})")
    return 0


def cmd_unpair(args: argparse.Namespace) -> int:
    from agent.ble_source import forget_device, keystore_path
    from drivers.ble.central import BleCentral

    cfg, port, _ = _ble_radio(args, args.radio)
    listed = forget_device(cfg.agent.state_dir, args.address)
    bonded = BleCentral(port, keystore_path(cfg.agent.state_dir)).unpair(args.address.upper())
    if not (listed or bonded):
        raise GlucoagentError(f"{args.address} is not paired with this box")
    print(f"unpaired: {args.address.upper()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glucoagent", description="Device agent of a connected glucometer.")
    parser.add_argument("--version", action="version", version=f"glucoagent {__version__}")
    parser.add_argument("--config", type=Path, help=f"UCI configuration file (default {DEFAULT_CONFIG} if present)")
    parser.add_argument("--state-dir", type=Path, help="override agent.state_dir (keys, certificate, buffer)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("provision", help="enrol this box with a one-time token and bind it to a patient")
    p.add_argument("--endpoint", required=True, help="mqtts://HOST:PORT of the fleet broker")
    p.add_argument("--token", required=True, help="single-use enrolment token from the clinic")
    p.add_argument("--patient", required=True, help="patient reference from the clinic (sent once, never in telemetry)")
    p.add_argument("--key-type", choices=("ed25519", "p256"), help="device key type (default from config: ed25519)")
    p.add_argument("--ca", type=Path, help="fleet CA certificate (default STATE_DIR/factory/ca.crt)")
    p.add_argument("--claim-cert", type=Path, help="factory claim certificate (default STATE_DIR/factory/claim.crt)")
    p.add_argument("--claim-key", type=Path, help="factory claim key (default STATE_DIR/factory/claim.key)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the provisioning service")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("status", help="provisioning, link, buffer, meters and clock at a glance")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="self-test: serial ports, broker reachable, TLS handshake, clock sane")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "run", help="run the agent daemon (procd starts this); unprovisioned or misconfigured, it waits idle for a fix"
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("deprovision", help="wipe key, certificate and buffer (refuses while readings are unsent)")
    p.add_argument("--force", action="store_true", help="wipe even unsent readings")
    p.set_defaults(func=cmd_deprovision)

    p = sub.add_parser("hotplug", help="tell the daemon a serial device came or went (what the hotplug script does in shell)")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("devname", help="device name, e.g. ttyUSB0")
    p.set_defaults(func=cmd_hotplug)

    p = sub.add_parser(
        "pair", help="bond with a Bluetooth LE glucose meter or blood-pressure cuff (lists what it sees)"
    )
    p.add_argument("address", nargs="?", help="the device's address (default: the only health device seen)")
    p.add_argument("--passkey", type=int, help="the 6-digit passkey the device shows (default: asked for)")
    p.add_argument("--just-works", action="store_true", help="pair without a passkey (devices without a display)")
    p.add_argument("--kind", choices=("glucose", "blood-pressure"), help="when the device is not seen advertising")
    p.add_argument("--scan", type=float, default=5.0, help="seconds to scan (default 5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the device (default 10)")
    p.add_argument("--radio", help="the 'config ble' section to use (default: the only one)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the Bluetooth exchange to stderr (never keys)")
    p.set_defaults(func=cmd_pair)
    p = sub.add_parser("unpair", help="forget a Bluetooth LE device: its bond keys and its place in the device list")
    p.add_argument("address")
    p.add_argument("--radio", help="the 'config ble' section it was paired through (default: the only one)")
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    p.set_defaults(func=cmd_unpair)
    add_driver_parsers(sub)  # simulate, decode: drivers/cli.py
    return parser


def dispatch(args: argparse.Namespace, prog: str) -> int:
    """Run ``args.func(args)``; an agent or driver error -> ``PROG: error: ...`` and its class's exit code
    (20 for a meter or pen reader that failed, 10 for a driver's bad input such as an unknown protocol)."""
    try:
        return int(args.func(args))
    except (GlucoagentError, DriverError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv), "glucoagent")


if __name__ == "__main__":
    sys.exit(main())
