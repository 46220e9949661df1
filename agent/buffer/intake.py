"""What the buffer takes in: ``Intake`` (one record to accept) and ``Recorder``, which turns what the
meters and pens gave us into signed, buffered records.

A whole meter read is one batch: its new readings, the alerts they raise and
the meter ledger commit together, so a crash leaves either all of it or none
(the meter still holds what was not committed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from agent.buffer.store import CLINICAL, HEALTH, PRIO_ALERT, PRIO_HEALTH, PRIO_RECORD, Store
from agent.config import AlertsSection
from agent.errors import BufferFull, StorageUnavailable
from agent.identity.signer import Signer
from agent.wire import telemetry
from drivers.models import BloodPressureReading, GlucoseReading, InsulinDose, RangeFlag, Unit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Intake:
    """One record to accept. ``build(seq)`` signs it once its sequence number is known."""

    kind: str
    priority: int
    build: Callable[[int], bytes]
    record_key: str | None = None  # ledger key for meter/pen records

    @property
    def stream(self) -> str:
        return HEALTH if self.priority == PRIO_HEALTH else CLINICAL


def glucose_alerts(r: GlucoseReading, limits: AlertsSection) -> list[tuple[str, str]]:
    """Alert codes a reading raises. Control-solution results never raise patient alerts."""
    if r.control_solution:
        return []
    value, when, shown = r.value_mgdl, r.meter_time.isoformat(), _shown(r)
    if r.range_flag is RangeFlag.LOW or value < limits.severe_hypo_mgdl:
        return [("hypo_severe", f"glucose {shown} below {limits.severe_hypo_mgdl} at {when}")]
    if value < limits.hypo_mgdl:
        return [("hypo", f"glucose {shown} below {limits.hypo_mgdl} at {when}")]
    if r.range_flag is RangeFlag.HIGH or value > limits.hyper_mgdl:
        return [("hyper", f"glucose {shown} above {limits.hyper_mgdl} at {when}")]
    return []


def _shown(r: GlucoseReading) -> str:
    """The value as an alert message states it. A HIGH/LOW result's value_mgdl is only the meter's limit,
    so it must not read as a measurement."""
    if r.range_flag is RangeFlag.LOW:
        return f"{r.native_value}, below the meter's range ({r.value_mgdl} mg/dL),"
    if r.range_flag is RangeFlag.HIGH:
        return f"{r.native_value}, above the meter's range ({r.value_mgdl} mg/dL),"
    if r.native_unit is Unit.MMOLL:
        return f"{r.value_mgdl} mg/dL ({r.native_value} mmol/L)"
    return f"{r.value_mgdl} mg/dL"


class Recorder:
    def __init__(self, store: Store, signer: Signer, limits: AlertsSection) -> None:
        self.store = store
        self.signer = signer
        self.limits = limits
        # Called after an alert or a health sample is stored (urgent: a clinical one), so the uplink, which
        # waits on its socket rather than polling the buffer, sends it at once (the daemon points it at
        # Uplink.wake). Readings, doses and BP wake it through their reader's on_stored, after the reader
        # has noted the source (a status snapshot never shows them delivered from an unknown meter).
        self.on_stored: Callable[[bool], None] = lambda urgent: None

    def accept_readings(self, source: str, readings: Sequence[GlucoseReading], *, complete: bool) -> list[int]:
        """Store the new readings of one meter read; returns their sequence numbers."""
        known = self.store.known_keys(source, [r.record_key for r in readings])
        items: list[Intake] = []
        for r in readings:
            items.append(
                Intake(
                    telemetry.Kind.READING,
                    PRIO_RECORD,
                    self.signer.builder(telemetry.Kind.READING, telemetry.reading_entries(r)),
                    r.record_key,
                )
            )
            if r.record_key in known:
                continue
            for code, message in glucose_alerts(r, self.limits):
                extra: dict[str, str | int | float | bool] = {
                    "meter": r.meter_serial,
                    "key": r.record_key,
                    "mgdl": r.value_mgdl,
                }
                items.append(
                    Intake(
                        telemetry.Kind.ALERT,
                        PRIO_ALERT,
                        self.signer.builder(telemetry.Kind.ALERT, telemetry.alert_entries(code, message, extra)),
                    )
                )
        complete_keys = [r.record_key for r in readings] if complete else None
        return self._accept(items, source, complete_keys)

    def accept_doses(self, source: str, doses: Sequence[InsulinDose], *, complete: bool) -> list[int]:
        items = [
            Intake(
                telemetry.Kind.DOSE,
                PRIO_RECORD,
                self.signer.builder(telemetry.Kind.DOSE, telemetry.dose_entries(d)),
                d.record_key,
            )
            for d in doses
        ]
        return self._accept(items, source, [d.record_key for d in doses] if complete else None)

    def accept_bp(self, source: str, readings: Sequence[BloodPressureReading]) -> list[int]:
        """Blood-pressure measurements of one cuff connection; the ledger drops those already stored (a cuff
        sends its memory again on every connection). Never ``complete``: a cuff's memory is no full list."""
        items = [
            Intake(
                telemetry.Kind.BP,
                PRIO_RECORD,
                self.signer.builder(telemetry.Kind.BP, telemetry.bp_entries(r)),
                r.record_key,
            )
            for r in readings
        ]
        return self._accept(items, source, None)

    def _accept(self, items: list[Intake], source: str, complete_keys: list[str] | None) -> list[int]:
        try:
            seqs = self.store.accept(items, source=source, complete_keys=complete_keys, partial=True)
        except BufferFull as exc:
            log.error("%s; the meter keeps the rest until there is room", exc)
            self.raise_condition("buffer_full", str(exc))
            if exc.accepted:
                return exc.accepted
            raise
        if seqs and self.store.clear_condition("buffer_full"):
            log.info("buffer has room again")
        return seqs

    def alert(self, code: str, message: str, extra: dict[str, str | int | float | bool] | None = None) -> None:
        entries = telemetry.alert_entries(code, message, extra)
        item = Intake(telemetry.Kind.ALERT, PRIO_ALERT, self.signer.builder(telemetry.Kind.ALERT, entries))
        self.store.accept([item])
        self.on_stored(True)

    def raise_condition(self, code: str, message: str) -> None:
        """Record a local condition once per episode and send one alert for it."""
        try:
            if self.store.set_condition(code, message):
                self.alert(code, message)
        except (BufferFull, StorageUnavailable) as exc:
            log.error("could not record condition %s: %s", code, exc)

    def health(self, sample: dict[str, str | int | float | bool]) -> None:
        entries = telemetry.health_entries(sample)
        item = Intake(telemetry.Kind.HEALTH, PRIO_HEALTH, self.signer.builder(telemetry.Kind.HEALTH, entries))
        try:
            self.store.accept([item])
        except BufferFull:
            log.warning("buffer full: health sample not kept")
            return
        self.on_stored(False)  # duty mode: a health sample rides the next wake-up
