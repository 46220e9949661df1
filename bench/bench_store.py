"""Issue 4 figures: intake speed, put+ack throughput, bytes written per reading, memory vs backlog."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.buffer.intake import Intake, Recorder
from agent.buffer.store import CLINICAL, PRIO_RECORD, Store
from agent.config import AlertsSection
from agent.wire import telemetry
from bench.common import best_of, make_signer, written_bytes
from bench.table import Row
from drivers.models import GlucoseReading, RangeFlag
from drivers.simulators.records import random_records

READ = 500


def in_range(readings: list[GlucoseReading]) -> list[GlucoseReading]:
    """Values 100..179 mg/dL: no alerts, so a figure counts exactly the readings it names."""
    return [
        dataclasses.replace(
            r, value_mgdl=100 + i % 80, native_value=f"{100 + i % 80:03d}", range_flag=RangeFlag.IN_RANGE
        )
        for i, r in enumerate(readings)
    ]


def _intake_rate(tmp: Path) -> tuple[float, float]:
    readings = in_range(random_records("onetouch-ultra2", READ, seed=1))
    signer = make_signer()
    key = ed25519.Ed25519PrivateKey.generate()
    entries = [telemetry.reading_entries(r) for r in readings]

    def bare() -> float:
        t0 = time.perf_counter()
        for seq, e in enumerate(entries, 1):
            payload = telemetry.encode(
                telemetry.Header(signer.device_id, seq, telemetry.Kind.READING, signer.clock.now()), e
            )
            key.sign(payload)
        return READ / (time.perf_counter() - t0)

    counter = iter(range(10**6))

    def ours() -> float:
        store = Store(tmp / f"intake-{next(counter)}.db")
        recorder = Recorder(store, signer, AlertsSection())
        t0 = time.perf_counter()
        recorder.accept_readings("ultra2:bench", readings, complete=True)
        rate = READ / (time.perf_counter() - t0)
        store.close()
        return rate

    return best_of(3, ours), best_of(3, bare)


def _put_ack_rate(tmp: Path, n: int = 2000) -> tuple[float, float]:
    from persistqueue import SQLiteAckQueue

    def ours() -> float:
        store = Store(tmp / f"putack-{time.monotonic_ns()}.db")
        t0 = time.perf_counter()
        # As the agent uses it: a meter read is one batch, acks come per upload batch of 50.
        for i in range(0, n, 50):
            store.accept(
                [Intake("reading", PRIO_RECORD, lambda s: b"x" * 300, f"k{i + j}") for j in range(50)], source="m"
            )
            store.ack(CLINICAL, range(i + 1, i + 51))
        rate = n / (time.perf_counter() - t0)
        store.close()
        return rate

    def theirs() -> float:
        q = SQLiteAckQueue(str(tmp / f"pq-{time.monotonic_ns()}"), auto_commit=True, multithreading=False)
        for conn in (getattr(q, "_putter", None), getattr(q, "_getter", None)):
            if conn is not None:
                conn.execute("PRAGMA synchronous=FULL")  # same durability as ours
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(b"x" * 300)
            q.ack(q.get(block=False))
        return n / (time.perf_counter() - t0)

    return best_of(2, ours), best_of(2, theirs)


def _bytes_per_reading(tmp: Path, rounds: int = 100, per_read: int = 20) -> float:
    """Steady upload: small meter reads arrive, uploads are acknowledged, the buffer stays shallow."""
    signer = make_signer()
    store = Store(tmp / "steady.db")
    recorder = Recorder(store, signer, AlertsSection())
    readings = in_range(random_records("onetouch-ultra2", rounds * per_read, seed=3))[::-1]  # oldest first
    before = written_bytes()
    for r in range(rounds):
        held = readings[: (r + 1) * per_read][::-1]  # the meter's whole memory, newest first
        seqs = recorder.accept_readings("ultra2:steady", held, complete=True)
        store.ack(CLINICAL, seqs)
    total = written_bytes() - before
    store.close()
    return total / (rounds * per_read)


def _rss_with_backlog(tmp: Path, count: int) -> float:
    """Resident memory of the running agent while it drains ``count`` queued readings."""
    from bench.common import rss_kib
    from testbed.harness import LocalSystem, device_config

    with LocalSystem(tmp / f"rss-{count}") as system:
        state = system.device_dir()
        system.provision(state)
        from agent.clock import Clock
        from agent.identity.credentials import load_identity
        from agent.identity.signer import Signer

        ident = load_identity(state)
        store = Store(state / "buffer.db", max_records=3 * count)
        recorder = Recorder(store, Signer(ident.device_id, ident.key, ident.kid, Clock()), AlertsSection())
        batch = random_records("onetouch-ultra2", 1000, seed=5)
        for i in range(count // 1000):
            recorder.accept_readings(f"m{i}", batch, complete=False)
        store.close()
        config = device_config(state / "glucoagent.uci", [])
        agent = system.start_agent(state, config)
        peak = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(agent.pid))
            time.sleep(0.1)
        return peak / 1024


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        ours, bare = _intake_rate(tmp)
        put_ours, put_theirs = _put_ack_rate(tmp)
        per_reading = _bytes_per_reading(tmp)
        small, large = _rss_with_backlog(tmp, 1000), _rss_with_backlog(tmp, 200_000)
    return [
        Row(
            "intake of a 500-record read (sign+commit), readings/s",
            ours,
            bare,
            ">= 0.5x",
            ours / bare >= 0.5,
            "bare Ed25519 signing of the same packs",
        ),
        Row(
            "put + ack, readings/s (same durability)",
            put_ours,
            put_theirs,
            ">= 5x",
            put_ours / put_theirs >= 5,
            "persist-queue SQLiteAckQueue, synchronous=FULL",
        ),
        Row(
            "bytes written per reading, steady upload (flash wear)", per_reading, None, "<= 2048 B", per_reading <= 2048
        ),
        Row(
            "agent RSS with 200 000 queued, MiB",
            large,
            small,
            "diff < 2 MiB",
            large - small < 2,
            "agent RSS with 1 000 queued",
        ),
    ]
