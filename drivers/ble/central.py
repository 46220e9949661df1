"""The box's side of Bluetooth LE: a central over bumble on an HCI-over-UART controller.

``BleCentral(port, keystore)`` opens the controller at ``port`` (a UART such as /dev/ttyACM0, or the pty a
BLE simulator publishes) for each call and closes it after; every call is synchronous and runs bumble's
asyncio loop inside (call it from a thread that has no running loop). Bond keys live in the JSON key store
file the caller names (mode 0600), with the box's own static random address and IRK, so bonds survive
restarts. Every bumble, HCI or OS error leaves as a ``drivers.errors.BleError`` subclass.

GLS: "report stored records >= sequence N" on the Record Access Control Point; measurements and their
contexts are collected until the RACP response; a meter whose numbering restarted is recognised (the
newest record read before is asked for again and must come back with the same key). BLS: indications of
the measurements a cuff sends after connecting, until it goes quiet or disconnects; a repeat is dropped.
What verified before a failure is returned as a partial read with the error; nothing is invented.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from bumble import core, hci
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Device, DeviceConfiguration, Peer
from bumble.keys import JsonKeyStore
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.smp import ErrorCode
from bumble.transport import open_transport

from drivers.ble import bls, gls
from drivers.errors import (
    BleError,
    ControllerAbsent,
    ControllerNotResponding,
    DeviceOutOfRange,
    InvalidResponse,
    NotBonded,
    PairingRefused,
    ProfileMissing,
    RecordAccessError,
    WrongPasskey,
)
from drivers.models import BloodPressureReading, GlucoseReading

log = logging.getLogger(__name__)
# bumble logs passkeys, TKs and DH keys at DEBUG: its loggers never go below INFO, whatever the box's level.
logging.getLogger("bumble").setLevel(logging.INFO)
T = TypeVar("T")
NAMESPACE = "glucoagent"
IDENTITY = "glucoagent-identity"  # our own address and IRK, next to the bonds in the same file
HEALTH_SERVICES = {gls.SERVICE: "glucose", bls.SERVICE: "blood-pressure"}
POWER_ON_TIMEOUT_S = 5.0
ATT_SECURITY_ERRORS = (0x05, 0x0C, 0x0F)  # insufficient authentication, encryption key size, encryption


@dataclasses.dataclass(frozen=True, slots=True)
class Advert:
    """A health device seen advertising."""

    address: str
    name: str
    services: tuple[str, ...]  # "glucose", "blood-pressure"
    rssi: int


@dataclasses.dataclass(frozen=True, slots=True)
class GlsCursor:
    """Where the last read ended: the newest stored record's sequence number and ledger key."""

    sequence: int
    record_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class GlucoseRead:
    readings: tuple[GlucoseReading, ...]
    rejected: tuple[str, ...]  # one message per measurement that did not verify
    complete: bool
    error: str | None = None
    restarted: bool = False  # the meter's numbering restarted: everything it holds was asked for
    cursor: GlsCursor | None = None  # the newest record seen (verified or not), for the next read


@dataclasses.dataclass(frozen=True, slots=True)
class BpRead:
    readings: tuple[BloodPressureReading, ...]
    rejected: tuple[str, ...]
    complete: bool
    error: str | None = None
    repeats: int = 0  # measurements the cuff sent again in this connection (dropped)


class _Keyboard(PairingDelegate):
    """The box's pairing side: the technician types the passkey the device shows; without a passkey
    provider the box can neither display nor type, so only Just Works is possible."""

    def __init__(self, passkey: Callable[[], int] | None) -> None:
        io = PairingDelegate.NO_OUTPUT_NO_INPUT if passkey is None else PairingDelegate.KEYBOARD_INPUT_ONLY
        super().__init__(io_capability=io)
        self._passkey = passkey

    async def get_number(self) -> int | None:
        return None if self._passkey is None else self._passkey()


class _KeyStore(JsonKeyStore):
    """bumble's JSON key store, written atomically with mode 0600 (bond keys are secrets)."""

    async def save(self, db: dict[str, dict[str, dict[str, Any]]]) -> None:
        _write_private(self.filename, db)


def _write_private(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(data, out, sort_keys=True, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _identity(path: Path) -> tuple[str, bytes]:
    """The box's static random address and IRK, created once (a real random IRK, never bumble's zeros)."""
    try:
        db = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        db = {}
    except (OSError, ValueError) as exc:
        raise BleError(f"bond key store {path} is unreadable: {exc}") from exc
    ident = db.get(IDENTITY)
    if not ident:
        raw = bytearray(secrets.token_bytes(6))
        raw[0] |= 0xC0  # static random address: the two top bits set
        ident = {"address": ":".join(f"{b:02X}" for b in raw), "irk": secrets.token_hex(16)}
        db[IDENTITY] = ident
        _write_private(path, db)
    return str(ident["address"]), bytes.fromhex(ident["irk"])


def _address(text: str) -> hci.Address:
    try:
        random = int(text[:2], 16) >= 0xC0  # static random addresses have the two top bits set
        kind = hci.Address.RANDOM_DEVICE_ADDRESS if random else hci.Address.PUBLIC_DEVICE_ADDRESS
        return hci.Address(text, kind)
    except (ValueError, core.InvalidArgumentError) as exc:
        raise BleError(f"not a Bluetooth address: {text!r}") from exc


def _pairing_error(exc: BaseException, address: str, *, passkey_given: bool) -> BleError:
    code = getattr(exc, "error_code", None)
    if not passkey_given and code in (ErrorCode.CONFIRM_VALUE_FAILED, ErrorCode.AUTHENTICATION_REQUIREMENTS):
        return PairingRefused(f"device {address} refused Just Works pairing: it requires its passkey")
    if code in (ErrorCode.CONFIRM_VALUE_FAILED, ErrorCode.PASSKEY_ENTRY_FAILED, ErrorCode.DHKEY_CHECK_FAILED):
        return WrongPasskey(f"pairing with {address} failed: wrong passkey (the device rejected the confirmation)")
    name = getattr(exc, "error_name", "") or type(exc).__name__
    return PairingRefused(f"pairing with {address} refused by the device ({name})")


async def _hang_up(connection: Connection) -> None:
    """Disconnect unless the device already did; never wait long (a dead link answers nothing)."""
    if connection.handle not in connection.device.connections:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.disconnect(), 3.0)


class BleCentral:
    """Synchronous entry points; each opens the controller, does one job and closes it."""

    def __init__(self, port: str, keystore: str | os.PathLike[str], *, connect_timeout: float = 10.0) -> None:
        self.port = port
        self.keystore = Path(keystore)
        self.connect_timeout = connect_timeout

    # --- public API ---------------------------------------------------------------------------------
    def scan(self, seconds: float = 5.0) -> list[Advert]:
        """Health devices (GLS or BLS) seen advertising within ``seconds``, strongest first."""
        return self._run(lambda device: self._scan(device, seconds))

    def pair(self, address: str, passkey: Callable[[], int] | None = None) -> None:
        """Bond with ``address`` (LE Secure Connections; ``passkey`` returns what the device shows, None for
        Just Works); the keys go to the key store."""
        self._run(lambda device: self._pair(device, address, passkey))

    def unpair(self, address: str) -> bool:
        """Forget the bond with ``address``; False when there was none. Touches only the key store."""
        store = _KeyStore(NAMESPACE, str(self.keystore))

        async def forget() -> bool:
            try:
                await store.delete(str(_address(address)))
            except KeyError:
                return False
            return True

        return asyncio.run(forget())

    def bonded(self) -> list[str]:
        """Addresses this box holds bond keys for."""

        async def names() -> list[str]:
            return [name for name, _ in await _KeyStore(NAMESPACE, str(self.keystore)).get_all()]

        return asyncio.run(names())

    def read_glucose(
        self, address: str, after: GlsCursor | None = None, *, procedure_timeout: float = 15.0
    ) -> GlucoseRead:
        """The records the meter holds after ``after`` (all of them when None)."""
        return self._run(lambda device: self._read_glucose(device, address, after, procedure_timeout))

    def read_bp(self, address: str, *, quiet_s: float = 3.0, max_s: float = 120.0) -> BpRead:
        """The measurements the cuff indicates after connecting, until it is quiet for ``quiet_s``
        or disconnects. The agent's ledger drops what it already holds (``record_key``)."""
        return self._run(lambda device: self._read_bp(device, address, quiet_s, max_s))

    # --- the asyncio side ---------------------------------------------------------------------------
    def _run(self, job: Callable[[Device], Awaitable[T]]) -> T:
        return asyncio.run(self._session(job))

    async def _session(self, job: Callable[[Device], Awaitable[T]]) -> T:
        if not os.path.exists(self.port):
            raise ControllerAbsent(f"BLE controller {self.port} is absent (no such port)")
        address, irk = _identity(self.keystore)
        try:
            transport = await open_transport(f"serial:{self.port}")
        except (OSError, core.BaseBumbleError, ValueError) as exc:
            raise ControllerAbsent(f"BLE controller {self.port} cannot be opened: {exc}") from exc
        try:
            config = DeviceConfiguration(name="glucoagent", address=_address(address), irk=irk)
            device = Device.from_config_with_hci(config, transport.source, transport.sink)
            device.keystore = _KeyStore(NAMESPACE, str(self.keystore))
            try:
                await asyncio.wait_for(device.power_on(), POWER_ON_TIMEOUT_S)
            except (TimeoutError, core.BaseBumbleError) as exc:
                raise ControllerNotResponding(f"BLE controller {self.port} does not answer HCI commands") from exc
            return await job(device)
        except BleError:
            raise
        except (core.BaseBumbleError, OSError) as exc:
            raise ControllerNotResponding(f"BLE controller {self.port} failed: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                await transport.close()

    async def _scan(self, device: Device, seconds: float) -> list[Advert]:
        seen: dict[str, Advert] = {}

        def on_advertisement(adv: Advertisement) -> None:
            uuids = (adv.data.get(AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS) or []) + (
                adv.data.get(AdvertisingData.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS) or []
            )
            services = tuple(HEALTH_SERVICES[s] for s in HEALTH_SERVICES if UUID.from_16_bits(s) in uuids)
            if not services:
                return
            name = adv.data.get(AdvertisingData.COMPLETE_LOCAL_NAME) or adv.data.get(
                AdvertisingData.SHORTENED_LOCAL_NAME
            )
            key = str(adv.address).removesuffix("/P")
            seen[key] = Advert(key, str(name or ""), services, int(adv.rssi))

        device.on(device.EVENT_ADVERTISEMENT, on_advertisement)
        await device.start_scanning(filter_duplicates=False)
        await asyncio.sleep(seconds)
        await device.stop_scanning()
        return sorted(seen.values(), key=lambda a: -a.rssi)

    async def _advertising(self, device: Device, address: str) -> None:
        """Wait until ``address`` advertises (a meter does after a measurement or a button press).
        Connecting only then keeps a missing device from reaching the controller as a connect attempt."""
        wanted = str(_address(address)).removesuffix("/P")
        seen = asyncio.Event()

        def on_advertisement(adv: Advertisement) -> None:
            if str(adv.address).removesuffix("/P") == wanted and adv.is_connectable:
                seen.set()

        device.on(device.EVENT_ADVERTISEMENT, on_advertisement)
        await device.start_scanning(filter_duplicates=False)
        try:
            await asyncio.wait_for(seen.wait(), self.connect_timeout)
        except TimeoutError:
            raise DeviceOutOfRange(
                f"device {address} not seen advertising within {self.connect_timeout:g} s: "
                "switched off, asleep or out of range"
            ) from None
        finally:
            device.remove_listener(device.EVENT_ADVERTISEMENT, on_advertisement)
            await device.stop_scanning()

    async def _connect(self, device: Device, address: str) -> Connection:
        await self._advertising(device, address)
        try:
            return await device.connect(_address(address), timeout=self.connect_timeout)
        except (core.TimeoutError, TimeoutError, core.ConnectionError, hci.HCI_Error) as exc:
            raise DeviceOutOfRange(
                f"device {address} not reachable: not advertising or out of range ({type(exc).__name__})"
            ) from exc

    async def _pair(self, device: Device, address: str, passkey: Callable[[], int] | None) -> None:
        device.pairing_config_factory = lambda _conn: PairingConfig(
            sc=True, mitm=passkey is not None, bonding=True, delegate=_Keyboard(passkey)
        )
        connection = await self._connect(device, address)
        try:
            await connection.pair()
        except (core.ProtocolError, core.BaseBumbleError, asyncio.CancelledError) as exc:
            raise _pairing_error(exc, address, passkey_given=passkey is not None) from exc
        finally:
            await _hang_up(connection)
        log.info("bonded with %s", address)

    async def _secure(self, device: Device, address: str) -> tuple[Connection, Peer]:
        """Connect to a bonded device and encrypt with the stored keys."""
        keys = await device.keystore.get(str(_address(address))) if device.keystore else None
        if keys is None:
            raise NotBonded(f"no bond with {address}: pair it first (glucoagent pair)")
        connection = await self._connect(device, address)
        try:
            await connection.encrypt()
        except (core.BaseBumbleError, hci.HCI_Error) as exc:
            await _hang_up(connection)
            raise PairingRefused(f"device {address} refused the stored bond (pair it again): {exc}") from exc
        return connection, Peer(connection)

    async def _characteristics(self, peer: Peer, service: int, uuids: Collection[int]) -> dict[int, Any]:
        await peer.discover_services([UUID.from_16_bits(service)])
        await peer.discover_characteristics()
        found: dict[int, Any] = {}
        for uuid in uuids:
            chars = peer.get_characteristics_by_uuid(UUID.from_16_bits(uuid))
            if chars:
                found[uuid] = chars[0]
        return found

    async def _read_glucose(
        self, device: Device, address: str, after: GlsCursor | None, timeout: float
    ) -> GlucoseRead:
        connection, peer = await self._secure(device, address)
        collector = _GlsCollector(address)
        lost = asyncio.Event()
        connection.on(connection.EVENT_DISCONNECTION, lambda *_: lost.set())
        try:
            chars = await self._characteristics(peer, gls.SERVICE, (gls.MEASUREMENT, gls.CONTEXT, gls.RACP))
            for needed in (gls.MEASUREMENT, gls.RACP):
                if needed not in chars:
                    raise ProfileMissing(f"device {address} has no Glucose {'Measurement' if needed == gls.MEASUREMENT else 'RACP'}")
            await peer.subscribe(chars[gls.MEASUREMENT], collector.on_measurement, prefer_notify=True)
            if gls.CONTEXT in chars:
                await peer.subscribe(chars[gls.CONTEXT], collector.on_context, prefer_notify=True)
            await peer.subscribe(chars[gls.RACP], collector.on_racp, prefer_notify=False)
            start = after.sequence if after else None
            reply = await collector.procedure(peer, chars[gls.RACP], start, lost, timeout)
            restarted = False
            if after is not None and not collector.confirms(after, reply):
                # The newest record we read before is gone or changed: the meter's numbering restarted.
                log.warning("%s: sequence %d no longer holds %s: numbering restarted, reading all", address,
                            after.sequence, after.record_key)
                restarted = True
                collector.reset()
                reply = await collector.procedure(peer, chars[gls.RACP], None, lost, timeout)
            if reply.code not in (gls.Response.SUCCESS, gls.Response.NO_RECORDS_FOUND):
                raise RecordAccessError(f"meter {address} answered the record request: {reply.describe()}")
            return collector.result(complete=True, restarted=restarted, skip=after)
        except _Partial as exc:
            return collector.result(complete=False, error=str(exc), skip=after)
        except (core.BaseBumbleError, hci.HCI_Error) as exc:
            if lost.is_set():
                return collector.result(complete=False, error=f"{address} disconnected during the transfer", skip=after)
            if getattr(exc, "error_code", None) in ATT_SECURITY_ERRORS:
                raise PairingRefused(
                    f"meter {address} refuses this bond for its records (not authenticated): pair again with the passkey"
                ) from exc
            raise DeviceOutOfRange(f"device {address}: link failed: {exc}") from exc
        finally:
            await _hang_up(connection)

    async def _read_bp(self, device: Device, address: str, quiet_s: float, max_s: float) -> BpRead:
        received_at = dt.datetime.now(dt.UTC)
        connection, peer = await self._secure(device, address)
        lost = asyncio.Event()
        connection.on(connection.EVENT_DISCONNECTION, lambda *_: lost.set())
        values: list[bytes] = []
        arrived = asyncio.Event()

        def on_indication(value: bytes) -> None:
            values.append(bytes(value))
            arrived.set()

        error: str | None = None
        try:
            chars = await self._characteristics(peer, bls.SERVICE, (bls.MEASUREMENT,))
            if bls.MEASUREMENT not in chars:
                raise ProfileMissing(f"device {address} has no Blood Pressure Measurement")
            await peer.subscribe(chars[bls.MEASUREMENT], on_indication, prefer_notify=False)
            deadline = asyncio.get_running_loop().time() + max_s
            while not lost.is_set() and asyncio.get_running_loop().time() < deadline:
                arrived.clear()
                waiter = asyncio.ensure_future(arrived.wait())
                gone = asyncio.ensure_future(lost.wait())
                done, pending = await asyncio.wait({waiter, gone}, timeout=quiet_s, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if not done:
                    break  # quiet: the cuff has sent what it holds
        except (core.BaseBumbleError, hci.HCI_Error) as exc:
            if not lost.is_set():
                raise DeviceOutOfRange(f"device {address}: link failed: {exc}") from exc
            error = f"{address} disconnected during the transfer"
        finally:
            await _hang_up(connection)
        readings: dict[str, BloodPressureReading] = {}
        rejected: list[str] = []
        raw_seen: set[bytes] = set()
        repeats = 0
        for value in values:
            if value in raw_seen:
                repeats += 1
                continue
            raw_seen.add(value)
            try:
                reading = bls.to_reading(bls.decode_measurement(value), address, received_at)
            except InvalidResponse as exc:
                rejected.append(f"{exc} ({value.hex()})")
                continue
            if reading.record_key in readings:
                repeats += 1
                continue
            readings[reading.record_key] = reading
        return BpRead(tuple(readings.values()), tuple(rejected), error is None, error, repeats)


class _Partial(Exception):
    pass


class _GlsCollector:
    """Pairs measurements with their contexts as notifications arrive; verifies each into a reading."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.reset()
        self.replies: asyncio.Queue[gls.RacpReply] = asyncio.Queue()
        self.progress = asyncio.Event()

    def reset(self) -> None:
        self.measurements: dict[int, tuple[bytes, gls.Measurement]] = {}
        self.contexts: dict[int, gls.Context] = {}
        self.order: list[int] = []
        self.rejected: list[str] = []
        self.repeats = 0

    def on_measurement(self, value: bytes) -> None:
        self.progress.set()
        value = bytes(value)
        try:
            m = gls.decode_measurement(value)
        except InvalidResponse as exc:
            self.rejected.append(f"{exc} ({value.hex()})")
            return
        if m.sequence in self.measurements:
            if self.measurements[m.sequence][0] != value:
                self.rejected.append(f"glucose measurement {m.sequence} sent twice with different contents")
            self.repeats += 1
            return
        self.measurements[m.sequence] = (value, m)
        self.order.append(m.sequence)

    def on_context(self, value: bytes) -> None:
        self.progress.set()
        try:
            ctx = gls.decode_context(bytes(value))
        except InvalidResponse as exc:
            self.rejected.append(f"{exc} (context ignored)")
            return
        self.contexts.setdefault(ctx.sequence, ctx)  # a context without its measurement is simply unused

    def on_racp(self, value: bytes) -> None:
        self.progress.set()
        try:
            self.replies.put_nowait(gls.decode_racp(bytes(value)))
        except InvalidResponse as exc:
            self.rejected.append(f"{exc}")

    async def procedure(self, peer: Peer, racp: Any, start: int | None, lost: asyncio.Event, timeout: float) -> gls.RacpReply:
        """Write the report request and wait for its response code; ``timeout`` is the longest silence."""
        request = gls.report_all() if start is None else gls.report_from(start)
        await peer.write_value(racp, request, with_response=True)
        while True:
            self.progress.clear()
            reply_task = asyncio.ensure_future(self.replies.get())
            waits = {reply_task, asyncio.ensure_future(self.progress.wait()), asyncio.ensure_future(lost.wait())}
            done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if reply_task in done:
                reply = reply_task.result()
                if reply.op == gls.Op.RESPONSE_CODE and reply.request == gls.Op.REPORT_RECORDS:
                    return reply
                continue
            if lost.is_set():
                raise _Partial(f"{self.address} disconnected during the transfer")
            if not done:
                with contextlib.suppress(Exception):
                    await peer.write_value(racp, gls.abort(), with_response=True)
                raise _Partial(f"meter {self.address} sent nothing for {timeout:g} s: procedure timed out, aborted")

    def confirms(self, after: GlsCursor, reply: gls.RacpReply) -> bool:
        """The first record of a ">= after.sequence" read must be the one we already hold."""
        if reply.code != gls.Response.SUCCESS or after.sequence not in self.measurements:
            return False
        return gls.record_key(self.measurements[after.sequence][1]) == after.record_key

    def result(
        self, *, complete: bool, error: str | None = None, restarted: bool = False, skip: GlsCursor | None = None
    ) -> GlucoseRead:
        readings: list[GlucoseReading] = []
        rejected = list(self.rejected)
        cursor: GlsCursor | None = None
        for seq in sorted(self.order):
            _, m = self.measurements[seq]
            key = gls.record_key(m)
            cursor = GlsCursor(seq, key)
            if skip is not None and key == skip.record_key:
                continue  # the record the previous read ended on
            try:
                readings.append(gls.to_reading(m, self.contexts.get(seq), self.address))
            except InvalidResponse as exc:
                rejected.append(str(exc))
        if cursor is None and skip is not None and not restarted:
            cursor = skip
        return GlucoseRead(tuple(readings), tuple(rejected), complete, error, restarted, cursor)
