"""Driver benchmarks: a 500-record Ultra 2 dump at real 9600-baud pacing over a pty, and decoder rates.

``run() -> list[Row]``:
- read time of the whole ``DMP`` reply vs the time its bytes need on a 9600 8N1 wire (goal: within 5 %);
- records/s of each pure decoder vs a baseline that only splits the same bytes into lines/units,
  measured in the same run.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.table import Row
from drivers import contour_astm as ca
from drivers import onetouch_ultra2 as u2
from drivers import onetouch_ultraeasy as ue
from drivers.models import GlucoseReading
from drivers.simulators.base import BITS_PER_BYTE, DEFAULT_BAUD
from drivers.simulators.faults import NO_FAULTS
from drivers.simulators.pty_link import PtyLink
from drivers.simulators.records import random_records
from drivers.simulators.run import make_simulator

REPO = Path(__file__).resolve().parents[1]
DUMP_RECORDS = 500


def _vector_dump() -> bytes | None:
    vectors = Path(os.environ.get("GLUCOAGENT_VECTORS") or REPO.parent / "shared" / "vectors")
    path = vectors / "onetouch-ultra2" / "insulaudit-dmp-500.txt"
    return path.read_bytes() if path.is_file() else None


def _dump_records() -> tuple[list[GlucoseReading], str]:
    data = _vector_dump()
    if data is not None:
        decoded = u2.decode_capture(data)
        if len(decoded.readings) == DUMP_RECORDS and not decoded.rejected:
            return list(decoded.readings), "the real 500-record capture"
    return random_records(u2.PROTOCOL, DUMP_RECORDS, seed=500), "500 random records"


def bench_dump_at_9600() -> Row:
    records, source = _dump_records()
    serial = records[0].meter_serial
    reply = u2.encode_header(len(records), serial) + b"".join(u2.encode_record(r) for r in records)
    wire_s = (len(reply) + len(u2.encode_command(u2.CMD_DUMP))) * BITS_PER_BYTE / DEFAULT_BAUD
    with tempfile.TemporaryDirectory() as tmp:
        link = PtyLink(Path(tmp) / "ttyBENCH")
        stop = threading.Event()
        sim = make_simulator(u2.PROTOCOL, link, records, NO_FAULTS, baud=DEFAULT_BAUD, stop_event=stop)
        thread = threading.Thread(target=sim.serve, kwargs={"poll_s": 0.005}, daemon=True)
        thread.start()
        try:
            device = u2.Device(str(link.link))
            try:
                started = time.perf_counter()
                got = list(device.read_records())
                read_s = time.perf_counter() - started
            finally:
                device.close()
        finally:
            stop.set()
            thread.join(5)
            link.close()
    if [r.record_key for r in got] != [r.record_key for r in records]:
        raise RuntimeError("benchmark dump did not round-trip")
    return Row(
        figure="Ultra 2 500-record DMP read at 9600 baud (s)",
        ours=round(read_s, 3),
        baseline=round(wire_s, 3),
        goal="<= 1.05x wire time",
        met=read_s <= 1.05 * wire_s,
        baseline_name=f"{len(reply)} B on a 9600 8N1 wire",
        note=f"{source}, pty simulator paced at 10 bits/byte",
    )


def _rate(fn: Callable[[], int], min_s: float = 0.5) -> float:
    """Units per second of ``fn`` (which returns how many units it handled)."""
    units, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_s:
        units += fn()
    return units / elapsed


def _split_packets_by_length(data: bytes) -> int:
    n = at = 0
    while at + 1 < len(data):
        at += data[at + 1]
        n += 1
    return n


def bench_decoders() -> list[Row]:
    rows = []
    recs = {p: random_records(p, DUMP_RECORDS, seed=1) for p in (u2.PROTOCOL, ca.PROTOCOL, ue.PROTOCOL)}
    u2_data = _vector_dump() or (
        u2.encode_header(DUMP_RECORDS, "HAXGR4PV") + b"".join(u2.encode_record(r) for r in recs[u2.PROTOCOL])
    )
    header = "H|\\^&||pw|Bayer7410^1.0^7410-1^0|V=10600|500|||||P|1|20260301120000"
    texts = [header, "P|1", *(ca.encode_result(i, r) for i, r in enumerate(recs[ca.PROTOCOL], 1)), "L|1||N"]
    ca_data = b"".join(ca.encode_frame(i + 1, t, final=i == len(texts) - 1) for i, t in enumerate(texts))
    ue_data = b"".join(
        ue.encode_packet(ue.encode_record(r), ue.link_bits(s=i % 2)) for i, r in enumerate(recs[ue.PROTOCOL])
    )
    cases: list[tuple[str, Callable[[], int], Callable[[], int], str]] = [
        (
            "Ultra 2",
            lambda: len(u2.decode_capture(u2_data).readings),
            lambda: len(u2_data.split(b"\r\n")),
            "split into CR LF lines",
        ),
        (
            "Contour",
            lambda: len(ca.decode_capture(ca_data).readings),
            lambda: len(ca_data.split(b"\r\n")),
            "split into CR LF frames",
        ),
        (
            "UltraEasy",
            lambda: len(ue.decode_capture(ue_data).readings),
            lambda: _split_packets_by_length(ue_data),
            "cut packets by length byte",
        ),
    ]
    for name, decode, split, baseline_name in cases:
        ours, base = _rate(decode), _rate(split)
        rows.append(
            Row(
                figure=f"{name} decode rate (records/s)",
                ours=round(ours),
                baseline=round(base),
                goal="reported",
                met=None,
                baseline_name=baseline_name,
                note="pure decoder: checksum, fields, reading built",
            )
        )
    return rows


def run() -> list[Row]:
    return [bench_dump_at_9600(), *bench_decoders()]


if __name__ == "__main__":
    started = dt.datetime.now()
    for row in run():
        ratio = f"{row.ratio:.3f}x" if row.ratio is not None else "-"
        print(
            f"{row.figure}: {row.ours} vs {row.baseline} ({row.baseline_name}) = {ratio}; goal {row.goal}; met {row.met}"
        )
    print(f"(took {(dt.datetime.now() - started).total_seconds():.0f} s)")
