"""A simulated Bluetooth LE glucose meter (Glucose Profile 1.0) on a bumble virtual controller.

GLS service 0x1808 with Glucose Measurement (notify), Measurement Context (notify), Glucose Feature
(read) and the Record Access Control Point (write + indicate), behind LE Secure Connections pairing with
a passkey the "display" shows. Faults: disconnect mid-transfer, duplicate notifications, an RACP error
code, a slow meter, garbage (special-value) concentrations, not advertising (out of range).
A sequence restart is a records list whose numbering starts again (``GlucoseMeter.replace_records``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import threading
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from bumble.core import UUID
from bumble.device import Connection
from bumble.gatt import Characteristic, CharacteristicValue, Service

from drivers.ble import gls
from drivers.ble.sfloat import Special, encode_sfloat
from drivers.errors import BadRecordsFile
from drivers.simulators.ble_radio import Peripheral, VirtualRadio, run_until

log = logging.getLogger(__name__)
DEFAULT_ADDRESS = "C4:10:00:00:15:01"
DEFAULT_PASSKEY = 123456
ENCRYPTED_READ = Characteristic.Permissions.READ_REQUIRES_ENCRYPTION
ENCRYPTED_WRITE = Characteristic.Permissions.WRITE_REQUIRES_ENCRYPTION


@dataclasses.dataclass(frozen=True, slots=True)
class GlsRecord:
    sequence: int
    time: dt.datetime  # base time, meter-local
    mgdl: int
    meal: int | None = None  # GLS meal code (1 preprandial ... 5 bedtime): sends a Measurement Context
    control: bool = False
    status: int | None = None  # Sensor Status Annunciation bits


@dataclasses.dataclass(frozen=True, slots=True)
class GlsFaults:
    disconnect_after: int | None = None  # drop the link after N records of the first transfer
    duplicate_every: int = 0  # every Nth measurement notified twice (0: never)
    racp_error: int | None = None  # answer every report request with this response code
    slow_s: float = 0.0  # pause before each record
    garbage: frozenset[int] = frozenset()  # sequence numbers whose concentration is NaN
    silent: bool = False  # never advertise: out of range


def demo_records(count: int, start: dt.datetime | None = None, first_sequence: int = 1) -> list[GlsRecord]:
    """``count`` records, oldest first, 4 hours apart, deterministic values; every 7th has a meal context."""
    t0 = start or dt.datetime(2026, 1, 1, 7, 0)
    return [
        GlsRecord(
            sequence=first_sequence + i,
            time=t0 + dt.timedelta(hours=4 * i),
            mgdl=70 + (i * 37) % 180,
            meal=(1 + i % 3) if i % 7 == 0 else None,
        )
        for i in range(count)
    ]


def load_records(path: str) -> list[GlsRecord]:
    """A JSON array of {"sequence", "time" (ISO), "mgdl", optional "meal", "control", "status"}."""
    try:
        items = json.loads(Path(path).read_text())
        return [
            GlsRecord(
                int(o["sequence"]),
                dt.datetime.fromisoformat(o["time"]),
                int(o["mgdl"]),
                o.get("meal"),
                bool(o.get("control", False)),
                o.get("status"),
            )
            for o in items
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadRecordsFile(f"simulate ble-glucose: {path}: {exc}") from exc


def measurement_bytes(r: GlsRecord, *, garbage: bool = False) -> bytes:
    value = encode_sfloat(Special.NAN) if garbage else encode_sfloat(Decimal(r.mgdl).scaleb(-5))  # mg/dL -> kg/L
    return gls.encode_measurement(
        r.sequence,
        r.time,
        value,
        time_offset_min=0,
        sample_type=gls.TYPE_CONTROL_SOLUTION if r.control else 2,
        sample_location=gls.LOCATION_CONTROL_SOLUTION if r.control else 1,
        status=r.status,
        context_follows=r.meal is not None,
    )


class GlucoseMeter:
    """The meter's state and GATT behaviour; ``serve`` runs it until ``stop`` is set."""

    def __init__(
        self,
        records: Sequence[GlsRecord],
        faults: GlsFaults = GlsFaults(),
        *,
        name: str = "Glucose Meter SIM",
        address: str = DEFAULT_ADDRESS,
        passkey: int | None = DEFAULT_PASSKEY,
    ) -> None:
        self._records = list(records)
        self._lock = threading.Lock()
        self.faults = faults
        self.peripheral = Peripheral(name, address, passkey)
        self.transfers = 0  # report procedures started (tests look)
        self.ready = threading.Event()
        self._disconnected_once = False
        self._abort = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy = False

    # --- state a test changes while the meter runs --------------------------------------------------
    def add_records(self, records: Iterable[GlsRecord]) -> None:
        with self._lock:
            self._records.extend(records)

    def replace_records(self, records: Iterable[GlsRecord]) -> None:
        """The meter's memory is reset (new meter, battery out): numbering starts again."""
        with self._lock:
            self._records = list(records)

    def records(self) -> list[GlsRecord]:
        with self._lock:
            return list(self._records)

    # --- GATT ---------------------------------------------------------------------------------------
    def _service(self) -> Service:
        self.measurement = Characteristic(
            UUID.from_16_bits(gls.MEASUREMENT), Characteristic.Properties.NOTIFY, ENCRYPTED_READ, b""
        )
        self.context = Characteristic(UUID.from_16_bits(gls.CONTEXT), Characteristic.Properties.NOTIFY, ENCRYPTED_READ, b"")
        feature = int(gls.Feature.LOW_BATTERY_DETECTION | gls.Feature.RESULT_HIGH_LOW_DETECTION)
        self.feature = Characteristic(
            UUID.from_16_bits(gls.FEATURE), Characteristic.Properties.READ, ENCRYPTED_READ, feature.to_bytes(2, "little")
        )
        self.racp: Characteristic[bytes] = Characteristic(
            UUID.from_16_bits(gls.RACP),
            Characteristic.Properties.WRITE | Characteristic.Properties.INDICATE,
            ENCRYPTED_WRITE,
            CharacteristicValue(write=self._on_racp_write),
        )
        return Service(UUID.from_16_bits(gls.SERVICE), [self.measurement, self.context, self.feature, self.racp])

    def _on_racp_write(self, connection: Connection, value: bytes) -> None:
        request = gls.decode_racp_request(bytes(value))
        if request.op == gls.Op.ABORT:
            self._abort.set()
            if self._task is None or self._task.done():
                asyncio.get_running_loop().create_task(self._respond(connection, gls.Op.ABORT, gls.Response.SUCCESS))
            return
        if self._busy:
            asyncio.get_running_loop().create_task(
                self._respond(connection, request.op, gls.Response.PROCEDURE_NOT_COMPLETED)
            )
            return
        self._abort.clear()
        self._busy = True
        self._task = asyncio.get_running_loop().create_task(self._procedure(connection, request))

    async def _respond(self, connection: Connection, request: int, code: gls.Response) -> None:
        self._busy = False  # the procedure ends with its response: a new request may follow at once
        await self.radio.device.indicate_subscriber(connection, self.racp, gls.response(request, code))

    def _select(self, request: gls.RacpRequest) -> list[GlsRecord] | gls.Response:
        records = sorted(self.records(), key=lambda r: r.sequence)
        if request.operator == gls.Operator.ALL:
            return records
        if request.operator == gls.Operator.LAST:
            return records[-1:]
        if request.operator == gls.Operator.FIRST:
            return records[:1]
        if request.operator == gls.Operator.GREATER_OR_EQUAL:
            if request.filter_type != gls.FILTER_SEQUENCE:
                return gls.Response.OPERAND_NOT_SUPPORTED
            if len(request.operand) != 2:
                return gls.Response.INVALID_OPERAND
            start = int.from_bytes(request.operand, "little")
            return [r for r in records if r.sequence >= start]
        if request.operator in (gls.Operator.LESS_OR_EQUAL, gls.Operator.WITHIN_RANGE):
            return gls.Response.OPERATOR_NOT_SUPPORTED
        return gls.Response.INVALID_OPERATOR

    async def _procedure(self, connection: Connection, request: gls.RacpRequest) -> None:
        try:
            await self._run_procedure(connection, request)
        except Exception as exc:  # the central went away mid-procedure: the meter just stops
            log.info("meter: procedure ended: %s", exc)
            self._busy = False

    async def _run_procedure(self, connection: Connection, request: gls.RacpRequest) -> None:
        if request.op not in (gls.Op.REPORT_RECORDS, gls.Op.REPORT_NUMBER):
            await self._respond(connection, request.op, gls.Response.OP_CODE_NOT_SUPPORTED)
            return
        selected = self._select(request)
        if isinstance(selected, gls.Response):
            await self._respond(connection, request.op, selected)
            return
        if request.op == gls.Op.REPORT_NUMBER:
            self._busy = False
            await self.radio.device.indicate_subscriber(connection, self.racp, gls.number_response(len(selected)))
            return
        self.transfers += 1
        if self.faults.racp_error is not None:
            await self._respond(connection, request.op, gls.Response(self.faults.racp_error))
            return
        if not selected:
            await self._respond(connection, request.op, gls.Response.NO_RECORDS_FOUND)
            return
        device = self.radio.device
        for n, record in enumerate(selected):
            if self._abort.is_set():
                await self._respond(connection, gls.Op.ABORT, gls.Response.SUCCESS)
                return
            if n == self.faults.disconnect_after and not self._disconnected_once:
                self._disconnected_once = True
                log.info("meter: dropping the link after %d records", n)
                self._busy = False
                await connection.disconnect()
                return
            if self.faults.slow_s:
                await asyncio.sleep(self.faults.slow_s)
            data = measurement_bytes(record, garbage=record.sequence in self.faults.garbage)
            repeat = self.faults.duplicate_every and n % self.faults.duplicate_every == 0
            for _ in range(2 if repeat else 1):
                await device.notify_subscriber(connection, self.measurement, data)
                if record.meal is not None:
                    await device.notify_subscriber(
                        connection, self.context, gls.encode_context_meal(record.sequence, record.meal)
                    )
        await self._respond(connection, request.op, gls.Response.SUCCESS)

    # --- run ----------------------------------------------------------------------------------------
    async def run(self, link: str, stop: threading.Event) -> None:
        async with VirtualRadio(link, self.peripheral) as radio:
            self.radio = radio
            radio.device.add_service(self._service())
            if not self.faults.silent:
                await radio.advertise(gls.SERVICE)
            self.ready.set()
            await run_until(stop.is_set)

    def serve(self, link: str, stop: threading.Event) -> None:
        asyncio.run(self.run(link, stop))


def serve_in_thread(meter: Any, link: str) -> tuple[threading.Thread, threading.Event]:
    """Run a simulated BLE device (``GlucoseMeter`` or ``BpCuff``) in a thread; returns it and its stop event."""
    stop = threading.Event()
    thread = threading.Thread(target=meter.serve, args=(link, stop), daemon=True, name=f"ble-sim {link}")
    thread.start()
    if not meter.ready.wait(15):
        stop.set()
        raise RuntimeError(f"BLE simulator on {link} did not start")
    return thread, stop
