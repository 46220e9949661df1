"""The virtual radio under the BLE simulators: two bumble controllers on one in-process LocalLink.

One controller speaks H4 HCI over a pseudo-terminal published at a symlink (``--link``): the central
(drivers/ble/central.py) opens it as ``serial:LINK`` exactly as it would open a UART controller. The other
controller drives the simulated device's own host in this process. The air between them is the LocalLink.
Imports bumble: loaded only by ``glucoagent simulate ble-glucose|ble-bp`` and the BLE tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bumble.controller import Controller
from bumble.device import Device, DeviceConfiguration
from bumble.hci import Address, OwnAddressType
from bumble.host import Host
from bumble.link import LocalLink
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink

log = logging.getLogger(__name__)
#: Fast advertising (ms): bumble's default 1 s interval makes every connect take seconds.
ADVERTISING_INTERVAL_MS = 20.0


@dataclasses.dataclass(frozen=True, slots=True)
class Peripheral:
    name: str
    address: str  # static random (two top bits set), the device's identity
    passkey: int | None  # None: Just Works (a device with no display)


class _Display(PairingDelegate):
    """The device shows ``passkey`` (a meter's display); without one it offers Just Works only."""

    def __init__(self, passkey: int | None) -> None:
        io = PairingDelegate.NO_OUTPUT_NO_INPUT if passkey is None else PairingDelegate.DISPLAY_OUTPUT_ONLY
        super().__init__(io_capability=io)
        self._passkey = passkey

    async def confirm(self, auto: bool = False) -> bool:
        """Just Works asks this: a device that shows a passkey refuses unauthenticated pairing."""
        return self._passkey is None

    async def generate_passkey(self) -> int:
        return self._passkey or 0

    async def display_number(self, number: int, digits: int) -> None:
        log.info("device display: passkey %0*d", digits, number)


class _BoxController(Controller):
    """The box's controller. A real controller reset (a new host starting, e.g. the agent after a crash) ends its
    links, and the peer sees the link supervision timeout; bumble's reset leaves them, so a simulated meter would
    stay "connected" to a dead central and never advertise again."""

    def on_hci_reset_command(self, command: Any) -> Any:
        from bumble import hci, ll

        for connection in list(self.le_connections.values()):
            connection.send_ll_control_pdu(ll.TerminateInd(hci.HCI_CONNECTION_TIMEOUT_ERROR))
            del self.le_connections[connection.peer_address]
        return super().on_hci_reset_command(command)


class VirtualRadio:
    """Open with ``async with VirtualRadio(link, peripheral) as radio``; ``radio.device`` is the device host."""

    def __init__(self, link: str | os.PathLike[str], peripheral: Peripheral) -> None:
        self.link = Path(link)
        self.peripheral = peripheral
        self._transport: Any = None
        self.device: Device
        self.air = LocalLink()  # type: ignore[no-untyped-call]  # bumble leaves __init__ unannotated

    async def __aenter__(self) -> VirtualRadio:
        # A stale link (a simulator killed earlier) would make open_transport fail: remove it first.
        with contextlib.suppress(FileNotFoundError):
            if self.link.is_symlink():
                self.link.unlink()
        self._transport = await open_transport(f"pty:{self.link}")
        _BoxController("box", host_source=self._transport.source, host_sink=self._transport.sink, link=self.air)
        ours = Controller("device", link=self.air)
        config = DeviceConfiguration(
            name=self.peripheral.name,
            address=Address(self.peripheral.address),
            irk=secrets.token_bytes(16),  # a real IRK: bumble's default is all zeros
            advertising_interval_min=ADVERTISING_INTERVAL_MS,
            advertising_interval_max=ADVERTISING_INTERVAL_MS,
        )
        self.device = Device(config=config, host=Host(ours, AsyncPipeSink(ours)))
        passkey = self.peripheral.passkey
        self.device.pairing_config_factory = lambda _conn: PairingConfig(
            sc=True, mitm=passkey is not None, bonding=True, delegate=_Display(passkey)
        )
        await self.device.power_on()
        return self

    async def advertise(self, service_uuid16: int) -> None:
        from bumble.core import AdvertisingData

        data = AdvertisingData(
            [
                (AdvertisingData.FLAGS, bytes([0x06])),  # LE general discoverable, BR/EDR not supported
                (AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS, service_uuid16.to_bytes(2, "little")),
                (AdvertisingData.COMPLETE_LOCAL_NAME, self.peripheral.name.encode()),
            ]
        )
        await self.device.start_advertising(
            advertising_data=bytes(data),
            own_address_type=OwnAddressType.RANDOM,  # our static random address: no private-address rotation
            auto_restart=True,
            advertising_interval_min=ADVERTISING_INTERVAL_MS,
            advertising_interval_max=ADVERTISING_INTERVAL_MS,
        )

    async def __aexit__(self, *_: object) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
        with contextlib.suppress(FileNotFoundError):
            if self.link.is_symlink():
                self.link.unlink()


async def run_until(stop: Callable[[], bool], poll_s: float = 0.1) -> None:
    """Idle until ``stop()`` is true (a threading.Event's is_set, checked from the asyncio loop)."""
    while not stop():
        await asyncio.sleep(poll_s)
