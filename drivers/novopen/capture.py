"""Decode a capture of a pen session (the pen's replies, ``nvp_datatest.txt`` format) without a reader.

The pen's counterpart of every meter driver's ``decode_capture``; ``glucoagent decode --protocol novopen``.
"""

from __future__ import annotations

from typing import Any

from drivers.errors import DriverError
from drivers.novopen.doses import DEFAULT_PRIME_RULE, PrimeRule, dose_key, interpret
from drivers.novopen.session import CaptureReplay, SessionState, parse_capture, run_session


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
