"""`glucoagent-backend`: the reference cloud (PKI, broker config, service, tokens, commands, demo)."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.errors import GlucoagentError

log = logging.getLogger("glucoagent-backend")


def cmd_init(args: argparse.Namespace) -> int:
    from backend.home import BackendHome

    home = BackendHome(args.home)
    home.ensure()
    print(f"backend home ready: {home.root} (fleet CA {home.pki.ca_cert_path})")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from backend.home import BackendHome
    from backend.provisioning import new_token

    home = BackendHome(args.home)
    home.ensure()
    token = new_token()
    db = home.db()
    try:
        db.add_token(token, args.patient, args.ttl)
    finally:
        db.close()
    print(token)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from backend.home import BackendHome
    from backend.revocation import CrlKeeper

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Handlers first: a SIGTERM while the home and database are being opened still ends serve cleanly.
    stop = threading.Event()
    stoppers: list[Callable[[], None]] = [stop.set]

    def on_signal(*_: object) -> None:
        for s in list(stoppers):
            s()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    home = BackendHome(args.home)
    home.ensure()
    home.cert_days = args.cert_days
    # One worker: today's single connection does everything. More: this process keeps the control
    # topics and N ingest processes share telemetry and health (backend/workers.py says why).
    service = home.service(args.host, args.port, role="all" if args.workers == 1 else "control", cloud=args.cloud)
    stoppers.insert(0, service.stop)
    if stop.is_set():
        service.stop()
    if args.workers > 1:
        from backend.workers import WorkerPool

        pool = WorkerPool(args.workers, home.root, args.host, args.port, args.log_level, cloud=args.cloud)
        pool_thread = threading.Thread(target=pool.run, args=(stop,), name="ingest-workers", daemon=True)
        pool_thread.start()
    if args.retention_days is not None:
        from backend.retention import RetentionSweeper

        sweeper = RetentionSweeper(service.db, args.retention_days, args.retention_interval)
        threading.Thread(target=sweeper.run, args=(stop,), name="retention", daemon=True).start()

    thread = threading.Thread(target=service.run, name="backend", daemon=True)
    thread.start()
    # Re-issue the CRL daily (valid 30 days) and make the broker in this home reload it.
    keeper = CrlKeeper(home.pki, home.broker_dir, args.crl_check_interval)
    threading.Thread(target=keeper.run, args=(stop,), name="crl-keeper", daemon=True).start()
    stop.wait()
    thread.join(timeout=5)
    if args.workers > 1:
        pool_thread.join(timeout=15)
    return 0


def cmd_ingest_worker(args: argparse.Namespace) -> int:
    """One ingest worker of `serve --workers N` (started and restarted by it)."""
    from backend.home import BackendHome

    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s ingest-{args.slot} %(name)s: %(message)s"
    )
    service = BackendHome(args.home).ingest_worker(args.host, args.port, args.slot, cloud=args.cloud)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    service.run()
    service.db.close()
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from backend.home import BackendHome

    home = BackendHome(args.home)
    home.ensure()
    broker = home.broker(port=args.port)
    broker.start()
    print(f"mosquitto listening on {broker.host}:{broker.port} (config {broker.run_dir})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    broker.stop()
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke every certificate the cloud issued to a device, reload the broker, disconnect the device."""
    from cryptography import x509

    from backend.home import BackendHome
    from backend.pki import PkiError
    from backend.revocation import disconnect_identity, reload_broker

    home = BackendHome(args.home)
    home.ensure()
    db = home.db()
    try:
        pems = db.device_certs(args.device)
    finally:
        db.close()
    if not pems:
        raise PkiError(f"no certificate was issued to a device {args.device!r} by this backend")
    serials = [x509.load_pem_x509_certificate(pem).serial_number for pem in pems]
    home.pki.revoke(*serials)
    print(f"revoked {len(serials)} certificate(s) of {args.device}")
    if not reload_broker(home.broker_dir, home.pki):
        print(f"no broker runs in {home.broker_dir}: it refuses {args.device} from its next start")
        return 0
    disconnect_identity(home.pki.backend, args.host, args.port, args.device)
    print(f"broker reloaded its CRL and closed every connection of {args.device}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glucoagent-backend", description="Reference cloud for glucoagent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    home_default = Path("backend-home")

    p = sub.add_parser("init", help="create the fleet PKI, command key and database")
    p.add_argument("--home", type=Path, default=home_default)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("token", help="issue a single-use enrolment token bound to a patient reference")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--patient", required=True)
    p.add_argument("--ttl", type=float, default=7 * 86_400, help="seconds the token stays valid")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("broker", help="run mosquitto with the fleet's TLS and ACL configuration")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--port", type=int, default=8883)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("serve", help="run the provisioning, ingest and ack service")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--retention-days",
        type=_positive,
        default=None,
        help="delete readings, doses, alerts and results stored more than N days ago (default: keep)",
    )
    p.add_argument("--retention-interval", type=_positive, default=3600.0, help="seconds between retention sweeps")
    p.add_argument(
        "--crl-check-interval",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds between CRL checks: re-issued once a day old, then the broker in this home reloads it",
    )
    p.add_argument("--cert-days", type=float, default=365.0, metavar="D", help="lifetime of device certificates issued")
    p.add_argument(
        "--workers",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="ingest processes sharing telemetry and health via an MQTT 5 shared subscription, on any --cloud "
        "(where it delivers them) (default 1: one process does everything)",
    )
    p.add_argument(
        "--cloud",
        default="glucoagent",
        choices=("glucoagent", "azure", "aws"),
        help="the cloud the boxes use: glucoagent (this broker), azure (IoT Hub via its bridge) or aws "
        "(IoT Core: its topic rule delivers; commands as jobs); docs/clouds.md",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ingest-worker", help="one ingest process of `serve --workers N` (serve starts these)")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--slot", type=_at_least_one, required=True, help="worker number: client id backend-ingest-N")
    p.add_argument("--cloud", default="glucoagent", choices=("glucoagent", "azure", "aws"), help="as serve's --cloud")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_ingest_worker)

    p = sub.add_parser(
        "revoke", help="revoke a device's certificates, make the broker reload its CRL and disconnect the device"
    )
    p.add_argument("device", help="device id (certificate CN)")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--host", default="localhost", help="the broker, to disconnect the device")
    p.add_argument("--port", type=int, default=8883)
    p.set_defaults(func=cmd_revoke)

    try:
        from backend.command_cli import add_parser as add_command_parser
    except ImportError:
        pass
    else:
        add_command_parser(sub, home_default)

    p = sub.add_parser("release", help="sign a package's release manifest with the release key (docs/updates.md)")
    p.add_argument("package", type=Path, help="the .ipk or .apk as the build wrote it")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--min-from", default="0", metavar="VERSION", help="oldest running version it may replace")
    p.add_argument("--allow-downgrade", action="store_true", help="may replace a newer running version (a recall)")
    p.add_argument("--name", default=None, help="package name (default: from the file name)")
    p.add_argument("--version", default=None, help="package version (default: from the file name)")
    p.add_argument("--out", type=Path, default=None, help="where to write the manifest (default: PACKAGE.manifest)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("devices", help="list each box: link status, running agent version, last update outcome")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--json", action="store_true", help="one JSON object per device")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("erase", help="delete every reading, dose, alert and binding of a patient (audited)")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--patient", required=True)
    p.add_argument("--operator", default=None, help="who asks for the erasure (default: the login name)")
    p.set_defaults(func=cmd_erase)
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text}")
    return value


def cmd_release(args: argparse.Namespace) -> int:
    from agent.wire.release import decode_manifest
    from backend.files import atomic_write
    from backend.home import BackendHome
    from backend.release import MANIFEST_SUFFIX, ReleaseSpec, sign_release

    home = BackendHome(args.home)
    home.ensure()
    spec = ReleaseSpec(min_from=args.min_from, downgrade=args.allow_downgrade, name=args.name, version=args.version)
    signed = sign_release(home.release_key, args.package, spec)
    out = args.out or args.package.with_name(args.package.name + MANIFEST_SUFFIX)
    atomic_write(out, signed)
    m = decode_manifest(signed, home.release_key.public_key())
    home.releases.put(args.package, m.sha256)  # what `serve` hands out to boxes' chunk requests
    print(f"{out}: {m.name} {m.version} ({m.format}, {m.size} bytes, sha256 {m.sha256.hex()}), "
          f"from {m.min_from}, downgrade {'allowed' if m.downgrade else 'refused'}")  # fmt: skip
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from backend.fleet import devices, render
    from backend.home import BackendHome

    home = BackendHome(args.home)
    home.ensure()
    db = home.db()
    try:
        views = devices(db)
    finally:
        db.close()
    for line in ([json.dumps(dataclasses.asdict(v), sort_keys=True) for v in views] if args.json else render(views)):
        print(line)
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from backend.home import BackendHome

    home = BackendHome(args.home)
    home.ensure()
    db = home.db()
    try:
        deleted = db.erase_patient(args.patient, operator=args.operator or getpass.getuser(), salt=home.audit_salt)
    finally:
        db.close()
    detail = ", ".join(f"{n} {t}" for t, n in sorted(deleted.items())) or "nothing stored"
    print(f"erased: {sum(deleted.values())} rows ({detail}); audit record kept without the patient reference")
    return 0


def dispatch(args: argparse.Namespace, prog: str) -> int:
    """Run ``args.func(args)``; an expected failure -> one line ``PROG: error: ...`` and its exit code.
    Not ``agent.cli.dispatch``: the cloud imports only ``agent.wire`` and the error root (the layering)."""
    try:
        return int(args.func(args))
    except GlucoagentError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # every file the cloud writes (database, WAL, keys, salt) is the owner's only
    return dispatch(build_parser().parse_args(argv), "glucoagent-backend")


if __name__ == "__main__":
    sys.exit(main())
