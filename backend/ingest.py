"""Ingest: a telemetry or health batch verified record by record against the publishing device's registered
keys, de-duplicated by (device, stream, sequence number) and stored in one transaction, under the patient
binding in force. A record that verifies but cannot be stored as data is quarantined whole, and still
acknowledged. A mixin of ``BackendService``, which signs and sends the acks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable

from agent.errors import GlucoagentError, SignatureError
from agent.wire import cose, telemetry, topics
from agent.wire.batch import BatchError, decode_batch
from backend.commands import device_key_lookup
from backend.db import INT64_MAX, BackendDb, jsonable

log = logging.getLogger(__name__)
MAX_BATCH = 1000


@dataclasses.dataclass(slots=True)
class IngestStats:
    """Where an ingest process's time went (logged when a worker stops; bench/bench_ingest.py reads it)."""

    batches: int = 0
    records: int = 0
    verify_s: float = 0.0  # COSE verify + SenML decode
    store_s: float = 0.0  # the transaction, commit included (the write-lock wait is part of it)

    def line(self, lock_wait_s: float) -> str:
        return (
            f"ingest stats: {self.batches} batches, {self.records} records, verify {self.verify_s:.3f} s, "
            f"store {self.store_s:.3f} s of which write-lock wait {lock_wait_s:.3f} s, "
            f"process CPU {time.process_time():.3f} s"
        )


class IngestMixin:
    db: BackendDb
    stats: IngestStats
    _keys: dict[tuple[str, bytes], cose.PublicKey]
    on_record: Callable[[str, telemetry.Record], None] | None

    def _key_for(
        self, device_id: str, seen: list[bytes] | None = None
    ) -> Callable[[bytes | None], cose.PublicKey | None]:
        # keys are only ever added for a (device, kid): safe to keep for the service's life
        return device_key_lookup(self.db, device_id, seen, cache=self._keys)

    def ingest(self, device_id: str, leaf: str, payload: bytes) -> dict[str, list[int]]:
        """Verify, de-duplicate and store a batch; returns the sequence numbers to acknowledge."""
        try:
            items = decode_batch(payload, MAX_BATCH)
        except BatchError as exc:
            self.db.bump("rejected_batches")
            log.warning("%s: %s", device_id, exc)
            return {}
        key_for = self._key_for(device_id)
        t0 = time.perf_counter()
        good: list[tuple[telemetry.Record, bytes]] = []
        for item in items:
            try:
                if not isinstance(item, bytes):
                    raise SignatureError("batch item is not a byte string")
                verified = cose.verify1(item, key_for)
                rec = telemetry.decode(verified.payload)
                if rec.device_id != device_id:
                    raise SignatureError(f"record names device {rec.device_id}, published by {device_id}")
                if (rec.kind is telemetry.Kind.HEALTH) != (leaf == topics.HEALTH):
                    raise SignatureError(f"{rec.kind} record on the {leaf} topic")
            except (GlucoagentError, ValueError, TypeError, OverflowError) as exc:  # one record, not the batch
                self.db.bump("rejected_records")
                log.warning("%s: record rejected: %s", device_id, exc)
                continue
            good.append((rec, item))
        acks: dict[str, list[int]] = {"c": [], "h": [], "x": []}
        fresh: list[telemetry.Record] = []
        now = time.time()
        t1 = time.perf_counter()
        self.stats.verify_s += t1 - t0
        self.stats.batches += 1
        self.stats.records += len(items)
        with self.db.tx() as db:
            binding = BackendDb.open_binding(db, device_id)
            if binding is None:  # erased, or never provisioned here: nothing to attribute the data to
                BackendDb.count_in(db, "unbound_records", len(good))
                log.warning("%s: %d record(s) refused: the device has no patient binding", device_id, len(good))
                return {}
            for rec, raw in good:
                stream = "h" if rec.kind is telemetry.Kind.HEALTH else "c"
                row, problem = storable(rec)
                if problem is not None:
                    BackendDb.quarantine_record(
                        db, device_id=device_id, binding_id=binding[0], stream=stream, now=now, reason=problem, raw=raw
                    )
                    log.warning("%s: record rejected alone: %s", device_id, problem)
                    # Acknowledged: the cloud holds the signed bytes, so the box may let the row go.
                    acks[stream if 0 < rec.seq <= INT64_MAX else "x"].append(rec.seq)
                    continue
                stored = BackendDb.insert_record(
                    db, device_id=device_id, stream=stream, seq=rec.seq, kind=rec.kind.value, received_at=now,
                    wall=rec.wall, clock=rec.clock, fields=row, cose=raw, binding_id=binding[0],
                )  # fmt: skip
                if stored:
                    fresh.append(rec)
                else:
                    BackendDb.count_in(db, "duplicates")
                acks[stream].append(rec.seq)
        self.stats.store_s += time.perf_counter() - t1
        if self.on_record:
            for rec in fresh:
                self.on_record(device_id, rec)
        return {k: v for k, v in acks.items() if v}


def storable(rec: telemetry.Record) -> tuple[str, str | None]:
    """(fields as JSON, None) when every field fits its column; ("", why) when one does not.

    Checked before any SQL: SQLite raises OverflowError for an integer beyond 64 bits, and that
    would roll back the whole batch, so one bad record would block every good one with it.
    """
    if not 0 < rec.seq <= INT64_MAX:
        return "", f"seq {rec.seq} out of range 1..2**63-1"
    for name, value in (("wall", rec.wall), ("mono", rec.monotonic)):
        if not math.isfinite(value):
            return "", f"{name} is not a finite number"
    try:
        fields = json.dumps(jsonable(rec.fields), sort_keys=True, allow_nan=False)
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        return "", f"a field is out of range: {exc}"
    return fields, None
