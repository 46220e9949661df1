"""``glucoagent simulate`` and ``glucoagent decode`` (wired into agent/cli.py via ``add_parsers``).

Also runnable alone: ``python -m drivers.cli_commands simulate onetouch-ultra2 --link /tmp/ttyMETER``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.clitools import dispatch
from agent.errors import GlucoagentError, InvalidResponse
from drivers import readings_json
from drivers.registry import PROTOCOLS, driver_module
from drivers.simulators.base import DEFAULT_BAUD
from drivers.simulators.faults import Faults

PEN = "novopen"


def add_parsers(subparsers: Any) -> None:
    """Add ``simulate`` and ``decode`` to an argparse subparsers object."""
    p = subparsers.add_parser("simulate", help="serve a simulated meter or pen reader on a pseudo-terminal")
    p.add_argument("protocol", choices=[*sorted(PROTOCOLS), PEN])
    p.add_argument("--link", required=True, help="symlink to create for the pty, e.g. /tmp/ttyMETER")
    p.add_argument("--records", help="JSON array of readings (docs/readings.md), newest first; default: demo set")
    p.add_argument("--serial", help="meter serial number (default: from the records, else per protocol)")
    p.add_argument("--clock-skew", type=float, default=0.0, help="meter clock minus local time, seconds")
    p.add_argument("--baud", type=float, default=DEFAULT_BAUD, help="pacing; 0 = as fast as possible")
    g = p.add_argument_group("faults")
    g.add_argument("--noise", type=float, default=0.0, help="probability of noise bytes per line/frame/packet")
    g.add_argument("--drop", type=float, default=0.0, help="probability of a dropped byte per unit")
    g.add_argument("--bad-checksum", type=float, default=0.0, help="probability of a wrong checksum per unit")
    g.add_argument("--repeat", type=float, default=0.0, help="probability a unit is sent twice (lost ACK)")
    g.add_argument("--slow", type=float, default=0.0, help="extra seconds before every reply")
    g.add_argument("--unplug-after", type=int, help="pull the cable after N records")
    g.add_argument("--switched-on", action="store_true", help="meter left switched on (not in data mode)")
    g.add_argument("--seed", type=int, help="fault RNG seed")
    pen = p.add_argument_group("novopen (the NFC reader with a pen in its field)")
    pen.add_argument("--doses", help="JSON dose log to serve (docs/pen.md)")
    pen.add_argument("--capture", help="captured pen session to replay byte for byte")
    pen.add_argument("--remove-at", type=int, help="the pen leaves the field at this exchange")
    pen.add_argument("--corrupt-at", type=int, action="append", default=[], help="reply frame number to damage")
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("decode", help="decode a raw capture of meter bytes into readings")
    p.add_argument("--protocol", required=True, choices=[*sorted(PROTOCOLS), PEN])
    p.add_argument("capture", help="file with the raw bytes the meter sent (novopen: the pen's replies, hex text)")
    p.add_argument("--json", action="store_true", help="print a JSON array of readings (docs/readings.md)")
    p.set_defaults(func=cmd_decode)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.protocol == PEN:
        from drivers.novopen.cli import simulate_main

        return simulate_main(
            args.link, args.doses, args.capture, remove_at=args.remove_at, corrupt_at=args.corrupt_at, slow_s=args.slow
        )
    from drivers.simulators import records as demo
    from drivers.simulators.run import link_path, serve

    try:
        faults = Faults(
            noise=args.noise,
            drop=args.drop,
            bad_checksum=args.bad_checksum,
            repeat=args.repeat,
            slow_s=args.slow,
            unplug_after=args.unplug_after,
            switched_on=args.switched_on,
            seed=args.seed,
        )
    except ValueError as exc:
        raise GlucoagentError(f"simulate: {exc}") from exc
    readings = readings_json.load_file(args.records) if args.records else demo.demo_records(args.protocol)
    link = link_path(args.link)
    print(f"simulating {args.protocol} on {link} ({len(readings)} records); Ctrl-C to stop", file=sys.stderr)
    serve(
        args.protocol,
        link,
        readings,
        faults,
        baud=args.baud or None,
        serial=args.serial,
        clock_skew_s=args.clock_skew,
    )
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    try:
        data = Path(args.capture).read_bytes()
    except OSError as exc:
        raise GlucoagentError(f"decode: cannot read {args.capture}: {exc}") from exc
    if args.protocol == PEN:
        from drivers.novopen.cli import decode_capture

        print(json.dumps(decode_capture(data), indent=1))
        return 0
    decoded = driver_module(args.protocol).decode_capture(data)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glucoagent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return dispatch(args, "glucoagent")


if __name__ == "__main__":
    sys.exit(main())
