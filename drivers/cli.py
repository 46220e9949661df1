"""``simulate`` and ``decode``: the one command line of the drivers, for every registered protocol.

``glucoagent simulate|decode`` adds these parsers (agent/cli.py calls ``add_parsers``); the same
commands run alone as ``python -m drivers.cli simulate onetouch-ultra2 --link /tmp/ttyMETER``.
Every expected failure is one line ``glucoagent: error: ...`` and the error class's exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drivers import readings_json
from drivers.errors import BadRecordsFile, DriverError, DriverUsageError, InputUnreadable, InvalidResponse
from drivers.models import GlucoseReading
from drivers.registry import PROTOCOLS, SIMULATED, driver_module, is_ble, is_pen

PROG = "glucoagent"
#: Flags that shape a simulated meter / a simulated pen reader; giving one to the other kind is an error.
METER_FLAGS = (
    "records",
    "serial",
    "clock_skew",
    "baud",
    "noise",
    "drop",
    "bad_checksum",
    "repeat",
    "unplug_after",
    "switched_on",
    "seed",
)
PEN_FLAGS = ("doses", "capture", "remove_at", "away_polls", "corrupt_at")
BLE_FLAGS = (
    "count",
    "passkey",
    "just_works",
    "address",
    "disconnect_after",
    "duplicate_every",
    "racp_error",
    "garbage",
    "silent",
)


def add_parsers(subparsers: Any) -> None:
    """Add ``simulate`` and ``decode`` to an argparse subparsers object."""
    protocols = list(PROTOCOLS)
    p = subparsers.add_parser(
        "simulate", help="serve a simulated meter, pen reader or BLE device (its virtual controller) on a pseudo-terminal"
    )
    p.add_argument("protocol", choices=list(SIMULATED))
    p.add_argument(
        "--link", required=True, help="symlink to create for the pty, e.g. /tmp/ttyMETER (BLE: the controller's HCI UART)"
    )
    p.add_argument("--slow", type=float, default=0.0, help="extra seconds before every reply")
    m = p.add_argument_group("meters")
    m.add_argument("--records", help="JSON array of readings (docs/readings.md), newest first; default: demo set")
    m.add_argument("--serial", help="meter serial number (default: from the records, else per protocol)")
    m.add_argument("--clock-skew", type=float, help="meter clock minus local time, seconds (default 0)")
    m.add_argument("--baud", type=float, help="pacing in baud (default: a real meter's); 0 = as fast as possible")
    m.add_argument("--noise", type=float, help="probability of noise bytes per line/frame/packet")
    m.add_argument("--drop", type=float, help="probability of a dropped byte per unit")
    m.add_argument("--bad-checksum", type=float, help="probability of a wrong checksum per unit")
    m.add_argument("--repeat", type=float, help="probability a unit is sent twice (lost ACK)")
    m.add_argument("--unplug-after", type=int, help="pull the cable after N records")
    m.add_argument("--switched-on", action="store_true", default=None, help="meter left switched on (not in data mode)")
    m.add_argument("--seed", type=int, help="fault RNG seed")
    pen = p.add_argument_group("novopen (the NFC reader with a pen in its field)")
    pen.add_argument("--doses", help="JSON dose log to serve (docs/pen.md); default: an empty pen")
    pen.add_argument("--capture", help="captured pen session to replay byte for byte")
    pen.add_argument("--remove-at", type=int, help="the pen leaves the field at this exchange")
    pen.add_argument("--away-polls", type=int, help="empty target polls before the pen is back (default 1)")
    pen.add_argument("--corrupt-at", type=int, action="append", help="reply frame number to damage (repeatable)")
    ble = p.add_argument_group("ble-glucose, ble-bp (a GATT server behind a virtual controller; docs/ble.md)")
    ble.add_argument("--count", type=int, help="stored records to generate (default 300 glucose, 40 blood pressure)")
    ble.add_argument("--passkey", type=int, help="the passkey the device shows (default 123456 / 654321)")
    ble.add_argument("--just-works", action="store_true", default=None, help="no display: Just Works pairing only")
    ble.add_argument("--address", help="the device's static random address")
    ble.add_argument("--disconnect-after", type=int, help="drop the link after N records of the first transfer")
    ble.add_argument("--duplicate-every", type=int, help="send every Nth record twice")
    ble.add_argument("--racp-error", type=int, help="ble-glucose: answer record requests with this RACP response code")
    ble.add_argument("--garbage", type=int, action="append", help="record (glucose: sequence; bp: index) sent as NaN")
    ble.add_argument("--silent", action="store_true", default=None, help="never advertise (out of range)")
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("decode", help="decode a raw capture of what a meter or pen sent")
    p.add_argument("--protocol", required=True, choices=protocols)
    p.add_argument("capture", help="file with the raw bytes the meter sent (novopen: the pen's replies, hex text)")
    p.add_argument("--json", action="store_true", help="print JSON (meters: docs/readings.md; novopen: docs/pen.md)")
    p.set_defaults(func=cmd_decode)


def _given(args: argparse.Namespace, flags: Sequence[str]) -> list[str]:
    return ["--" + f.replace("_", "-") for f in flags if getattr(args, f) is not None]


def _link(value: str) -> Path:
    path = Path(value)
    if not path.parent.is_dir():
        raise DriverUsageError(f"simulate --link: directory {path.parent} does not exist")
    return path


def cmd_simulate(args: argparse.Namespace) -> int:
    if is_ble(args.protocol):
        return _simulate_ble(args)
    pen = is_pen(args.protocol)
    wrong = _given(args, (*(METER_FLAGS if pen else PEN_FLAGS), *BLE_FLAGS))
    if wrong:
        kind = "a pen reader" if pen else "a meter"
        raise DriverUsageError(f"simulate {args.protocol}: {', '.join(wrong)} does not apply to {kind}")
    link = _link(args.link)
    return _simulate_pen(args, link) if pen else _simulate_meter(args, link)


def _simulate_meter(args: argparse.Namespace, link: Path) -> int:
    # the simulators are imported here, not at the top: the daemon builds this parser too (docs/field.md)
    from drivers.simulators import records as demo
    from drivers.simulators.base import DEFAULT_BAUD
    from drivers.simulators.faults import Faults
    from drivers.simulators.run import serve

    try:
        faults = Faults(
            noise=args.noise or 0.0,
            drop=args.drop or 0.0,
            bad_checksum=args.bad_checksum or 0.0,
            repeat=args.repeat or 0.0,
            slow_s=args.slow,
            unplug_after=args.unplug_after,
            switched_on=bool(args.switched_on),
            seed=args.seed,
        )
    except ValueError as exc:
        raise DriverUsageError(f"simulate: {exc}") from exc
    readings: list[GlucoseReading] = (
        readings_json.load_file(args.records) if args.records else demo.demo_records(args.protocol)
    )
    print(f"simulating {args.protocol} on {link} ({len(readings)} records); Ctrl-C to stop", file=sys.stderr)
    baud = DEFAULT_BAUD if args.baud is None else args.baud
    serve(
        args.protocol,
        link,
        readings,
        faults,
        baud=baud or None,
        serial=args.serial,
        clock_skew_s=args.clock_skew or 0.0,
    )
    return 0


def _simulate_pen(args: argparse.Namespace, link: Path) -> int:
    from drivers.simulators import novopen as sim
    from drivers.simulators.run import serve_pen

    if args.capture and args.doses:
        raise DriverUsageError(f"simulate {args.protocol}: give either --doses or --capture, not both")
    try:
        faults = sim.PenFaults(
            args.remove_at,
            1 if args.away_polls is None else args.away_polls,
            frozenset(args.corrupt_at or ()),
            args.slow,
        )
        source: sim.PenLog | sim.Capture
        if args.capture:
            source = sim.Capture.from_file(args.capture)
        else:
            source = sim.load_doses(args.doses) if args.doses else sim.PenLog()
    except (OSError, ValueError, KeyError, InvalidResponse) as exc:
        raise BadRecordsFile(f"simulate {args.protocol}: {exc}") from exc
    stats = serve_pen(link, source, faults)
    print(f"served {stats.exchanges} exchanges, {stats.sessions} sessions, {stats.nacks} NACKs", flush=True)
    return 0


def _simulate_ble(args: argparse.Namespace) -> int:
    import threading

    from drivers.simulators.run import stop_on_signals

    glucose = args.protocol == "ble-glucose"
    not_here = [f for f in METER_FLAGS if not (glucose and f == "records")]
    wrong = _given(args, (*not_here, *PEN_FLAGS, *(() if glucose else ("racp_error",))))
    if wrong:
        raise DriverUsageError(f"simulate {args.protocol}: {', '.join(wrong)} does not apply to {args.protocol}")
    if args.just_works and args.passkey is not None:
        raise DriverUsageError(f"simulate {args.protocol}: give either --passkey or --just-works")
    if args.passkey is not None and not 0 <= args.passkey <= 999999:
        raise DriverUsageError(f"simulate {args.protocol}: --passkey must be 0..999999")
    link = str(_link(args.link))
    options: dict[str, Any] = {}
    if args.address:
        options["address"] = args.address
    device: Any
    if glucose:
        from drivers.ble import gls
        from drivers.simulators import ble_glucose as sim

        options["passkey"] = None if args.just_works else (args.passkey if args.passkey is not None else sim.DEFAULT_PASSKEY)
        records = sim.load_records(args.records) if args.records else sim.demo_records(300 if args.count is None else args.count)
        try:
            faults = sim.GlsFaults(
                disconnect_after=args.disconnect_after,
                duplicate_every=args.duplicate_every or 0,
                racp_error=None if args.racp_error is None else int(gls.Response(args.racp_error)),
                slow_s=args.slow,
                garbage=frozenset(args.garbage or ()),
                silent=bool(args.silent),
            )
        except ValueError as exc:
            raise DriverUsageError(f"simulate {args.protocol}: {exc}") from exc
        device = sim.GlucoseMeter(records, faults, **options)
    else:
        from drivers.simulators import ble_bp as bp

        options["passkey"] = None if args.just_works else (args.passkey if args.passkey is not None else bp.DEFAULT_PASSKEY)
        faults_bp = bp.BpFaults(
            duplicate_every=args.duplicate_every or 0,
            disconnect_after=args.disconnect_after,
            slow_s=args.slow,
            garbage=frozenset(args.garbage or ()),
            silent=bool(args.silent),
        )
        device = bp.BpCuff(bp.demo_records(40 if args.count is None else args.count), faults_bp, **options)
    passkey = device.peripheral.passkey
    shown = "Just Works" if passkey is None else f"passkey {passkey:06d}"
    print(
        f"simulating {args.protocol} {device.peripheral.address} ({len(device.records())} records, {shown}); "
        f"its controller's HCI on {link}; Ctrl-C to stop",
        file=sys.stderr,
    )
    stop = threading.Event()
    with stop_on_signals(stop):
        device.serve(link, stop)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    try:
        data = Path(args.capture).read_bytes()
    except OSError as exc:
        raise InputUnreadable(f"decode: cannot read {args.capture}: {exc}") from exc
    decoded = driver_module(args.protocol).decode_capture(data)
    if is_pen(args.protocol):
        _print_pen(decoded, as_json=args.json)
        return 0
    for message in decoded.rejected:
        print(f"decode: rejected {message}", file=sys.stderr)
    if args.json:
        print(readings_json.dumps(decoded.readings))
    else:
        for r in decoded.readings:
            flags = " ".join(
                f
                for f in (
                    "CONTROL" if r.control_solution else "",
                    r.range_flag.upper() if r.range_flag != "in" else "",
                    "SUSPECT" if r.suspect else "",
                )
                if f
            )
            print(f"{r.meter_time.isoformat()}  {r.value_mgdl:4d} mg/dL  {r.native_value} {r.native_unit}  {flags}")
    if decoded.rejected:
        print(
            f"decode: {len(decoded.rejected)} unit(s) rejected, {len(decoded.readings)} readings kept", file=sys.stderr
        )
        return InvalidResponse.exit_code
    return 0


def _print_pen(records: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(records, indent=1))
        return
    for r in records:
        if r["kind"] == "pen":
            print(f"pen {r['serial']} {r['model']} sw {r['firmware']} clock {r['pen_clock_s']} s")
        else:
            what = f"{r['units']} U" if r["kind"] == "dose" else f"rejected: {r['reason']}"
            print(f"{r['relative_time_s']:>10} (-{r['seconds_before_report']} s) {what}")


def dispatch(args: argparse.Namespace) -> int:
    """Run the command; a driver error -> one line on stderr and its exit code (as agent/cli.py dispatch does)."""
    try:
        return int(args.func(args))
    except DriverError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivers.cli", description="Simulate or decode a meter or pen.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
