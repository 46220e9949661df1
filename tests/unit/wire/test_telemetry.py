"""The telemetry record, which defines the clinical record: exact bytes, round trip, garbage refused."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import ALERT_PACK, BP, BP_PACK, DEV, DOSE, DOSE_PACK, HEALTH_PACK, READING, READING_PACK, TS

from agent.wire import telemetry as t


def _header(seq: int, kind: t.Kind) -> t.Header:
    return t.Header(DEV, seq, kind, TS)


def test_reading_record_is_byte_exact() -> None:
    assert t.encode(_header(7, t.Kind.READING), t.reading_entries(READING)) == READING_PACK


def test_dose_alert_health_records_are_byte_exact() -> None:
    assert t.encode(_header(8, t.Kind.DOSE), t.dose_entries(DOSE)) == DOSE_PACK
    alert = t.alert_entries("hypo_severe", "48 mg/dL", {"value_mgdl": 48})
    assert t.encode(_header(9, t.Kind.ALERT), alert) == ALERT_PACK
    health = t.health_entries({"uptime_s": 3723, "buffer_rows": 2, "link": "up", "meter": True})
    assert t.encode(_header(3, t.Kind.HEALTH), health) == HEALTH_PACK


def test_blood_pressure_record_is_byte_exact_with_11073_codes() -> None:
    assert t.encode(_header(10, t.Kind.BP), t.bp_entries(BP)) == BP_PACK
    f = t.decode(BP_PACK).fields
    # IEEE 11073-10101: partition 2 (SCADA) x 65536 + term 18949/18950/18951 (NIBP), 18474 (pulse, non-invasive)
    assert (f["bp:150021"], f["bp:150022"], f["bp:150023"], f["bp:149546"]) == (
        Decimal("121.5"),
        Decimal("79.0"),
        Decimal("93.2"),
        Decimal(64),
    )
    assert t.MDC_PRESS_BLD_NONINV_SYS == 2 * 65536 + 18949 and t.MDC_PULS_RATE_NON_INV == 2 * 65536 + 18474
    assert f["bp:native"] == "16.2/10.53/12.43 kPa" and f["bp:status"] == "body-movement,irregular-pulse"
    assert (f["bp:device"], f["bp:key"], f["bp:device_time"], f["bp:user"]) == (
        BP.device_serial,
        BP.record_key,
        "2026-01-01T07:30:00",
        1,
    )


def test_blood_pressure_without_map_pulse_or_time_leaves_those_entries_out() -> None:
    import dataclasses

    bare = dataclasses.replace(BP, map_mmhg=None, pulse_bpm=None, device_time=None, user_id=None, status=frozenset())
    f = t.decode(t.encode(_header(11, t.Kind.BP), t.bp_entries(bare))).fields
    assert not {"bp:150023", "bp:149546", "bp:device_time", "bp:user", "bp:status"} & set(f)


def test_reading_round_trip_keeps_every_clinical_field() -> None:
    rec = t.decode(READING_PACK)
    assert (rec.device_id, rec.seq, rec.kind, rec.clock) == (DEV, 7, t.Kind.READING, "synced")
    assert rec.wall == 1767225600.123 and rec.monotonic == 3723.457 and rec.boot_id == bytes(range(16))
    f = rec.fields
    assert f["glu"] == Decimal("1.12") and f["glu:mgdl"] == 112
    assert f["glu:native"] == "6.2 mmol/L" and f["glu:meter"] == "ZW1234567"
    assert f["glu:key"] == READING.record_key and f["glu:meter_time"] == "2026-01-01T00:59:00"
    assert (f["glu:range"], f["glu:meal"], f["glu:clock_offset"]) == ("in", "before", -42.5)
    assert f["glu:comment"] == "after run" and f["glu:suspect"] is True


def test_control_solution_is_named_apart() -> None:
    import dataclasses

    entries = t.reading_entries(dataclasses.replace(READING, control_solution=True))
    assert "glu" not in {e[t.N] for e in entries} and entries[0][t.N] == "glu:control"


def test_dose_round_trip() -> None:
    rec = t.decode(DOSE_PACK)
    assert rec.kind is t.Kind.DOSE and rec.fields["ins"] == Decimal("4.5") and rec.fields["ins:type"] == "aspart"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",
        cbor2.dumps([]),
        cbor2.dumps({"a": 1}),
        cbor2.dumps([1]),
        cbor2.dumps([{t.N: "seq", t.V: 1}]),  # no base name
        READING_PACK[:-3],
        cbor2.dumps([{**cbor2.loads(READING_PACK)[0], t.BT: 10**400}, *cbor2.loads(READING_PACK)[1:]]),  # bignum
    ],
)
def test_garbage_is_a_telemetry_error(payload: bytes) -> None:
    with pytest.raises(t.TelemetryError):
        t.decode(payload)


_cbor = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.integers(-4, 8) | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | _cbor.map(cbor2.dumps))
def test_random_input_is_refused_cleanly(payload: bytes) -> None:
    with contextlib.suppress(t.TelemetryError):
        t.decode(payload)


_value = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(5)), st.sampled_from([t.V, t.VS, t.VB, t.VD, t.BT, t.BN]), _value)
def test_a_valid_record_with_one_value_replaced_is_refused_cleanly(index: int, label: int, value: object) -> None:
    pack = cbor2.loads(READING_PACK)
    pack[index] = {**{k: v for k, v in pack[index].items() if k not in (t.V, t.VS, t.VB, t.VD)}, label: value}
    with contextlib.suppress(t.TelemetryError):
        t.decode(cbor2.dumps(pack))


def test_an_infinite_time_decodes_so_the_cloud_can_quarantine_it_with_its_reason() -> None:
    pack = cbor2.loads(READING_PACK)
    pack[0][t.BT] = float("inf")
    assert t.decode(cbor2.dumps(pack)).wall == float("inf")
