"""The readings JSON (docs/readings.md): round trip of every protocol's records, defaults, typed errors."""

from __future__ import annotations

import json

import pytest

from drivers import readings_json
from drivers.registry import METERS
from drivers.simulators.records import random_records


def test_readings_json_roundtrip_and_defaults() -> None:
    for protocol in METERS:
        for r in random_records(protocol, 20, seed=1):
            r = r.with_offset(-12.5)
            assert readings_json.from_json(json.loads(json.dumps(readings_json.to_json(r)))) == r
    minimal = readings_json.from_json({"meter_time": "2024-05-06T07:08:09", "value_mgdl": 99})
    assert (minimal.native_value, minimal.native_unit, minimal.range_flag, minimal.clock_offset_s) == (
        "99",
        "mg/dL",
        "in",
        None,
    )
    for bad, field in (
        ({"value_mgdl": 5}, "meter_time"),
        ({"meter_time": "x", "value_mgdl": 5}, "meter_time"),
        ({"meter_time": "2024-05-06T07:08:09", "value_mgdl": True}, "value_mgdl"),
        ({"meter_time": "2024-05-06T07:08:09", "value_mgdl": 5, "meal": "brunch"}, "brunch"),
        ({"meter_time": "2024-05-06T07:08:09", "value_mgdl": 5, "colour": "red"}, "colour"),
    ):
        with pytest.raises(readings_json.ReadingsFormatError, match=field):
            readings_json.from_json(bad)
