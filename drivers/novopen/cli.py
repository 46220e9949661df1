"""Command-line entry points for the pen: the simulator and the capture decoder.

``glucoagent simulate novopen`` and ``glucoagent decode --protocol novopen`` call
``simulate_main`` and ``decode_capture``; ``python -m drivers.novopen.cli simulate|decode``
works on its own for tests and the bench.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import DriverError, GlucoagentError
from drivers.novopen.doses import DEFAULT_PRIME_RULE, PrimeRule, dose_key, interpret
from drivers.novopen.session import CaptureReplay, SessionState, parse_capture, run_session

__all__ = ["decode_capture", "main", "simulate_main"]

log = logging.getLogger(__name__)


def decode_capture(data: bytes, prime_rule: PrimeRule = DEFAULT_PRIME_RULE) -> list[dict[str, Any]]:
    """Decode a capture of the pen's replies (``nvp_datatest.txt`` format), JSON-ready.

    The first record (``kind: "pen"``) is the identity and clock; then one ``kind: "dose"``
    per valid entry and one ``kind: "rejected"`` per entry that is not a dose, in pen order
    (newest first). No wall time: a capture has no host clock; ``seconds_before_report``
    is what the read would subtract from its clock.
    """
    replay = CaptureReplay(parse_capture(data))
    state = SessionState()
    error: str | None = None
    try:
        run_session(replay, state)
    except DriverError as exc:
        if state.identity is None:
            raise
        error = f"{type(exc).__name__}: {exc}"
    identity = state.identity
    if identity is None or state.mds is None:
        raise DriverError("capture holds no pen identity")
    config = state.config
    out: list[dict[str, Any]] = [
        {
            "kind": "pen",
            "serial": identity.serial,
            "model": identity.model,
            "manufacturer": identity.manufacturer,
            "firmware": identity.firmware,
            "part_number": state.mds.part_number,
            "system_id": state.mds.system_id.hex().upper(),
            "pen_clock_s": state.mds.relative_time,
            "store_capacity": config.store_capacity if config else None,
            "store_usage": config.store_usage if config else None,
            "reports": len(state.reports),
            "complete": state.complete,
            "error": error,
        }
    ]
    for item in interpret(state.reports, prime_rule):
        record: dict[str, Any] = {
            "kind": "dose" if item.valid else "rejected",
            "pen_serial": identity.serial,
            "relative_time_s": item.entry.relative_time,
            "report_relative_time_s": item.report_time,
            "seconds_before_report": item.seconds_before_report,
            "units": str(item.units) if item.units is not None else None,
            "units_raw_hex": f"{item.entry.units_raw:08X}",
            "flags_hex": f"{item.entry.flags:08X}",
        }
        if item.valid and item.units is not None:
            record["prime"] = item.prime
            record["record_key"] = dose_key(identity.serial, item.entry.relative_time, item.units)
        else:
            record["reason"] = item.reason
        out.append(record)
    return out


def simulate_main(
    link: str,
    doses_file: str | None,
    capture_file: str | None,
    *,
    remove_at: int | None = None,
    away_polls: int = 1,
    corrupt_at: Iterable[int] = (),
    slow_s: float = 0.0,
) -> int:
    """Serve the reader + pen on ``link`` until SIGINT/SIGTERM. Exit code 0, or the error's."""
    from drivers.simulators import novopen as sim  # the agent never needs the simulator

    if capture_file and doses_file:
        print("glucoagent: simulate novopen: give either --doses or --capture, not both", file=sys.stderr)
        return 2
    try:
        faults = sim.PenFaults(remove_at, away_polls, frozenset(corrupt_at), slow_s)
        if capture_file:
            source: sim.PenLog | sim.Capture = sim.Capture.from_file(capture_file)
        else:
            source = sim.load_doses(doses_file) if doses_file else sim.PenLog()
    except (OSError, ValueError, KeyError, GlucoagentError) as exc:
        print(f"glucoagent: simulate novopen: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from drivers.simulators.pty_link import PtyLink

    with PtyLink(link) as pty:
        print(f"novopen reader simulator on {link} ({pty.slave_name})", flush=True)
        stats = sim.serve(pty, source, faults, stop)
    print(f"served {stats.exchanges} exchanges, {stats.sessions} sessions, {stats.nacks} NACKs", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivers.novopen.cli", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    simp = sub.add_parser("simulate", help="serve a PN532 reader with a NovoPen on a pty")
    simp.add_argument("--link", required=True, help="symlink to create for the pty slave")
    simp.add_argument("--doses", help="JSON dose log to serve")
    simp.add_argument("--capture", help="captured session to replay byte for byte")
    simp.add_argument("--remove-at", type=int, help="pen leaves the field at this exchange")
    simp.add_argument("--away-polls", type=int, default=1)
    simp.add_argument("--corrupt-at", type=int, action="append", default=[], help="reply frame number to damage")
    simp.add_argument("--slow", type=float, default=0.0, help="seconds before every tag reply")
    dec = sub.add_parser("decode", help="decode a capture of the pen's replies")
    dec.add_argument("capture")
    dec.add_argument("--json", action="store_true", help="JSON output (default: one line per dose)")
    args = parser.parse_args(argv)
    if args.cmd == "simulate":
        return simulate_main(
            args.link,
            args.doses,
            args.capture,
            remove_at=args.remove_at,
            away_polls=args.away_polls,
            corrupt_at=args.corrupt_at,
            slow_s=args.slow,
        )
    try:
        records = decode_capture(Path(args.capture).read_bytes())
    except (OSError, GlucoagentError) as exc:
        print(f"glucoagent: decode: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
    else:
        for r in records:
            if r["kind"] == "pen":
                print(f"pen {r['serial']} {r['model']} sw {r['firmware']} clock {r['pen_clock_s']} s")
            else:
                what = f"{r['units']} U" if r["kind"] == "dose" else f"rejected: {r['reason']}"
                print(f"{r['relative_time_s']:>10} (-{r['seconds_before_report']} s) {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
