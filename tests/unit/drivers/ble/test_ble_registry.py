"""BLE protocols are registered apart from the serial ones: never probed, not a serial port's protocol."""

from __future__ import annotations

import importlib

from drivers import errors
from drivers.registry import BLE, CONFIG_CHOICES, PROBE_ORDER, PROTOCOLS, SIMULATED, is_ble, is_pen


def test_ble_protocols_are_simulated_but_not_serial() -> None:
    assert set(BLE) == {"ble-glucose", "ble-bp"}
    assert not set(BLE) & (set(PROTOCOLS) | set(CONFIG_CHOICES) | set(PROBE_ORDER))
    assert (*PROTOCOLS, *BLE) == SIMULATED
    assert all(is_ble(p) and not is_pen(p) for p in BLE) and not any(is_ble(p) for p in PROTOCOLS)
    assert {importlib.import_module(m).SERVICE for m in BLE.values()} == {0x1808, 0x1810}


def test_ble_errors_each_their_own_exit_code() -> None:
    classes = [
        errors.ControllerAbsent,
        errors.ControllerNotResponding,
        errors.DeviceOutOfRange,
        errors.PairingRefused,
        errors.WrongPasskey,
        errors.NotBonded,
        errors.ProfileMissing,
        errors.RecordAccessError,
    ]
    assert all(issubclass(c, errors.BleError) and issubclass(c, errors.DriverError) for c in classes)
    assert sorted(c.exit_code for c in classes) == list(range(21, 29))
    assert issubclass(errors.WrongPasskey, errors.PairingRefused)
