"""Bluetooth LE health devices: the Glucose (GLS) and Blood Pressure (BLS) profiles (docs/ble.md).

The codecs (``sfloat``, ``gls``, ``bls``) are pure and import no Bluetooth stack; only ``central``
and the BLE simulators import bumble, and nothing on the serial path imports this package.
"""
