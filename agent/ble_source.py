"""Bluetooth LE glucose meters and blood-pressure cuffs, read like the serial meters (docs/ble.md).

Loaded only when the configuration has a ``config ble`` section: this module imports no Bluetooth stack at
the top, and ``drivers.ble.central`` (bumble) is imported inside :meth:`BleSource.run` and the pairing
commands, so a box without BLE never loads it.

Which devices are read: the ones ``glucoagent pair`` bonded, listed with their kind in
``<state_dir>/ble-devices.json``; their bond keys are in ``<state_dir>/ble-bonds.json`` (bumble's key store,
mode 0600, never logged). A GLS meter's next read starts at the ledger key it stored last
(:meth:`Store.newest_key`), which commits with the records, so a crash never skips a record.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.buffer.intake import Recorder
from agent.config import BleRadio
from agent.errors import BufferFull, GlucoagentError
from drivers.errors import DriverError

log = logging.getLogger(__name__)
KEYSTORE = "ble-bonds.json"
DEVICES = "ble-devices.json"
GLUCOSE, BLOOD_PRESSURE = "glucose", "blood-pressure"  # drivers/ble/central.py HEALTH_SERVICES names
PROTOCOLS = {GLUCOSE: "ble-glucose", BLOOD_PRESSURE: "ble-bp"}


def keystore_path(state_dir: Path) -> Path:
    return state_dir / KEYSTORE


def load_devices(state_dir: Path) -> dict[str, dict[str, str]]:
    """address -> {"kind": glucose|blood-pressure, "name": advertised name, "radio": ble section}; {} when none."""
    try:
        data = json.loads((state_dir / DEVICES).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise GlucoagentError(f"{state_dir / DEVICES}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise GlucoagentError(f"{state_dir / DEVICES}: not a device list")
    return {str(a): {k: str(d.get(k, "")) for k in ("kind", "name", "radio")} for a, d in data.items()}


def save_devices(state_dir: Path, devices: dict[str, dict[str, str]]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{DEVICES}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(devices, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / DEVICES)


def source_name(kind: str, address: str) -> str:
    return f"{PROTOCOLS.get(kind, kind)}:{address.upper()}"


def gls_cursor_key(ledger_key: str | None) -> tuple[int, str] | None:
    """(sequence, key) of a GLS ledger key ``gls:<sequence>:<base time>``; None for anything else."""
    if not ledger_key or not ledger_key.startswith("gls:"):
        return None
    seq = ledger_key.split(":", 2)[1]
    return (int(seq), ledger_key) if seq.isdigit() else None


class BleSource:
    """One thread: rounds over the bonded devices; each read stores what is new and disconnects."""

    def __init__(self, radio: BleRadio, state_dir: Path, recorder: Recorder, on_stored: Callable[[], None]) -> None:
        self.radio = radio
        self.state_dir = state_dir
        self.recorder = recorder
        self.on_stored = on_stored
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._state: dict[str, str] = {}  # address -> last outcome logged (log once per change)
        self.errors = 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def read_now(self) -> None:
        self._wake.set()

    def run(self) -> None:
        from drivers.ble.central import BleCentral  # bumble: only on a box with a BLE controller

        central = BleCentral(self.radio.port, keystore_path(self.state_dir), connect_timeout=self.radio.connect_s)
        log.info("BLE: controller on %s", self.radio.port)
        while not self._stop.is_set():
            try:
                devices = load_devices(self.state_dir)
            except GlucoagentError as exc:
                self._note("*", f"device list: {exc}", logging.ERROR)
                devices = {}
            for address, dev in devices.items():
                if dev["radio"] != self.radio.name:
                    continue
                if self._stop.is_set():
                    break
                self.read_device(central, address, dev["kind"])
            self._wake.wait(self.radio.scan_s)
            self._wake.clear()

    def read_device(self, central: Any, address: str, kind: str) -> int:
        """Read one device and store what is new; every failure is logged (once per change) and survived."""
        try:
            stored = self._read(central, address, kind)
        except BufferFull:
            return 0
        except (DriverError, GlucoagentError) as exc:
            self.errors += 1
            self._note(address, f"{type(exc).__name__}: {exc}", logging.WARNING)
            return 0
        except Exception as exc:
            self.errors += 1
            self._note(address, f"unexpected {type(exc).__name__}: {exc}", logging.ERROR)
            log.debug("BLE %s: traceback", address, exc_info=True)
            return 0
        if stored:
            self.on_stored()
        return stored

    def _read(self, central: Any, address: str, kind: str) -> int:
        from drivers.ble.central import GlsCursor

        source = source_name(kind, address)
        store = self.recorder.store
        if kind == GLUCOSE:
            found = gls_cursor_key(store.newest_key(source))
            cursor = GlsCursor(*found) if found else None
            read = central.read_glucose(address, after=cursor)
            seqs = self.recorder.accept_readings(source, read.readings, complete=False)
            count, what = len(read.readings), "records"
        elif kind == BLOOD_PRESSURE:
            read = central.read_bp(address)
            seqs = self.recorder.accept_bp(source, read.readings)
            count, what = len(read.readings), "measurements"
        else:
            raise GlucoagentError(f"unknown BLE device kind {kind!r}")
        store.source_seen(source, PROTOCOLS[kind], self.radio.port, read.complete)
        for message in read.rejected:
            log.warning("BLE %s: %s", source, message)
        outcome = "read" if read.complete else f"cut off: {read.error}"
        self._note(address, outcome, logging.INFO if read.complete else logging.WARNING)
        level = logging.INFO if seqs or not read.complete else logging.DEBUG
        log.log(level, "BLE %s: %d %s, %d new%s", source, count, what, len(seqs),
                "" if read.complete else "; the rest on the next read")  # fmt: skip
        return len(seqs)

    def _note(self, address: str, outcome: str, level: int) -> None:
        """Log a device's outcome when it differs from the last one (a meter out of range all day: one line)."""
        if self._state.get(address) == outcome:
            return
        self._state[address] = outcome
        log.log(level, "BLE %s: %s", address, outcome)


def forget_device(state_dir: Path, address: str) -> bool:
    devices = load_devices(state_dir)
    removed = devices.pop(address.upper(), None) is not None
    if removed:
        save_devices(state_dir, devices)
    return removed


def remember_device(state_dir: Path, address: str, kind: str, name: str, radio: str) -> None:
    devices = load_devices(state_dir)
    devices[address.upper()] = {"kind": kind, "name": name, "radio": radio}
    save_devices(state_dir, devices)
