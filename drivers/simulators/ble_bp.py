"""A simulated Bluetooth LE blood-pressure cuff (Blood Pressure Profile 1.0) on a bumble virtual controller.

BLS service 0x1810: Blood Pressure Measurement (indicate) and Blood Pressure Feature (read). Like the A&D
UA-651BLE, the cuff indicates every stored measurement once the central has enabled indications over an
encrypted (bonded) link, then disconnects. Faults: a measurement indicated twice, disconnect mid-transfer,
a slow cuff, garbage (special-value) systolic pressures, not advertising.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Iterable, Sequence
from decimal import Decimal

from bumble.core import UUID
from bumble.device import Connection
from bumble.gatt import Characteristic, Service

from drivers.ble import bls
from drivers.ble.sfloat import Special, encode_sfloat
from drivers.simulators.ble_radio import Peripheral, VirtualRadio, run_until

log = logging.getLogger(__name__)
DEFAULT_ADDRESS = "C4:10:00:00:15:02"
DEFAULT_PASSKEY = 654321


@dataclasses.dataclass(frozen=True, slots=True)
class BpRecord:
    time: dt.datetime
    systolic: int
    diastolic: int
    mean_arterial: int
    pulse: int
    user_id: int = 1
    status: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class BpFaults:
    duplicate_every: int = 0  # every Nth measurement is indicated twice (0: never)
    disconnect_after: int | None = None  # drop the link after N measurements, once
    slow_s: float = 0.0
    garbage: frozenset[int] = frozenset()  # indexes whose systolic is NaN
    silent: bool = False
    stay_connected: bool = False  # do not disconnect after sending (the central's quiet timeout ends it)


def demo_records(count: int, start: dt.datetime | None = None) -> list[BpRecord]:
    t0 = start or dt.datetime(2026, 1, 1, 7, 30)
    return [
        BpRecord(
            time=t0 + dt.timedelta(hours=12 * i),
            systolic=112 + (i * 7) % 40,
            diastolic=70 + (i * 3) % 20,
            mean_arterial=85 + (i * 5) % 25,
            pulse=58 + (i * 11) % 40,
            status=0x0004 if i % 9 == 0 else 0,  # irregular pulse now and then
        )
        for i in range(count)
    ]


def measurement_bytes(r: BpRecord, *, garbage: bool = False) -> bytes:
    return bls.encode_measurement(
        encode_sfloat(Special.NAN if garbage else Decimal(r.systolic)),
        encode_sfloat(Decimal(r.diastolic)),
        encode_sfloat(Decimal(r.mean_arterial)),
        time=r.time,
        pulse=encode_sfloat(Decimal(r.pulse)),
        user_id=r.user_id,
        status=r.status,
    )


class BpCuff:
    def __init__(
        self,
        records: Sequence[BpRecord],
        faults: BpFaults = BpFaults(),
        *,
        name: str = "BP Cuff SIM",
        address: str = DEFAULT_ADDRESS,
        passkey: int | None = DEFAULT_PASSKEY,
    ) -> None:
        self._records = list(records)
        self._lock = threading.Lock()
        self.faults = faults
        self.peripheral = Peripheral(name, address, passkey)
        self.ready = threading.Event()
        self._disconnected_once = False

    def add_records(self, records: Iterable[BpRecord]) -> None:
        with self._lock:
            self._records.extend(records)

    def records(self) -> list[BpRecord]:
        with self._lock:
            return list(self._records)

    def _service(self) -> Service:
        self.measurement = Characteristic(
            UUID.from_16_bits(bls.MEASUREMENT),
            Characteristic.Properties.INDICATE,
            Characteristic.Permissions.READ_REQUIRES_ENCRYPTION,
            b"",
        )
        feature = Characteristic(
            UUID.from_16_bits(bls.FEATURE),
            Characteristic.Properties.READ,
            Characteristic.Permissions.READ_REQUIRES_ENCRYPTION,
            (0x0007).to_bytes(2, "little"),
        )
        self.measurement.on("subscription", self._on_subscription)
        return Service(UUID.from_16_bits(bls.SERVICE), [self.measurement, feature])

    def _on_subscription(self, connection: Connection, _notify: bool, indicate: bool) -> None:
        if indicate:
            asyncio.get_running_loop().create_task(self._send_stored(connection))

    async def _send_stored(self, connection: Connection) -> None:
        device = self.radio.device
        try:
            for n, record in enumerate(self.records()):
                if n == self.faults.disconnect_after and not self._disconnected_once:
                    self._disconnected_once = True
                    await connection.disconnect()
                    return
                if self.faults.slow_s:
                    await asyncio.sleep(self.faults.slow_s)
                data = measurement_bytes(record, garbage=n in self.faults.garbage)
                repeat = self.faults.duplicate_every and n % self.faults.duplicate_every == 0
                for _ in range(2 if repeat else 1):
                    await device.indicate_subscriber(connection, self.measurement, data)
            if not self.faults.stay_connected:
                await asyncio.sleep(0.2)
                await connection.disconnect()
        except Exception as exc:  # the central went away mid-transfer: the cuff just stops
            log.info("cuff: transfer ended: %s", exc)

    async def run(self, link: str, stop: threading.Event) -> None:
        async with VirtualRadio(link, self.peripheral) as radio:
            self.radio = radio
            radio.device.add_service(self._service())
            if not self.faults.silent:
                await radio.advertise(bls.SERVICE)
            self.ready.set()
            await run_until(stop.is_set)

    def serve(self, link: str, stop: threading.Event) -> None:
        asyncio.run(self.run(link, stop))
