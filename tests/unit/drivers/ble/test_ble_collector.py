"""How the central pairs GLS notifications into readings (no radio: the collector is fed the values)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from drivers.ble import gls
from drivers.ble.central import GlsCursor, _GlsCollector
from drivers.ble.sfloat import encode_sfloat
from drivers.models import Meal

T0 = dt.datetime(2026, 5, 1, 7, 0)


def _m(seq: int, mgdl: int, *, context: bool = False) -> bytes:
    return gls.encode_measurement(seq, T0 + dt.timedelta(hours=seq), encode_sfloat(Decimal(mgdl).scaleb(-5)),
                                  context_follows=context)


def test_contexts_pair_by_sequence_orphans_are_unused_repeats_counted_once() -> None:
    c = _GlsCollector("M")
    c.on_measurement(_m(2, 150, context=True))
    c.on_context(gls.encode_context_meal(2, 2))  # postprandial, for measurement 2
    c.on_context(gls.encode_context_meal(9, 1))  # a context without its measurement
    c.on_measurement(_m(1, 90))  # a measurement without context, arriving out of order
    c.on_measurement(_m(1, 90))  # the same notification again
    c.on_measurement(_m(3, 100, context=True))  # context announced but never sent
    c.on_measurement(b"\x02\x04")  # truncated
    read = c.result(complete=True)
    assert [(r.record_key.split(":")[1], r.value_mgdl, r.meal) for r in read.readings] == [
        ("1", 90, Meal.NONE), ("2", 150, Meal.AFTER), ("3", 100, Meal.NONE)]
    assert c.repeats == 1
    assert len(read.rejected) == 1 and "end before" in read.rejected[0]
    assert read.cursor == GlsCursor(3, read.readings[-1].record_key)


def test_a_repeat_with_other_contents_is_reported_and_the_first_kept() -> None:
    c = _GlsCollector("M")
    c.on_measurement(_m(5, 120))
    c.on_measurement(_m(5, 121))
    read = c.result(complete=True)
    assert [r.value_mgdl for r in read.readings] == [120]
    assert read.rejected == ("glucose measurement 5 sent twice with different contents",)


def test_the_record_a_read_ended_on_is_not_returned_again() -> None:
    c = _GlsCollector("M")
    c.on_measurement(_m(7, 110))
    c.on_measurement(_m(8, 111))
    first_key = gls.record_key(gls.decode_measurement(_m(7, 110)))
    reply = gls.decode_racp(gls.response(gls.Op.REPORT_RECORDS, gls.Response.SUCCESS))
    assert c.confirms(GlsCursor(7, first_key), reply)
    assert not c.confirms(GlsCursor(7, "gls:7:2020-01-01T00:00:00"), reply)
    read = c.result(complete=True, skip=GlsCursor(7, first_key))
    assert [r.value_mgdl for r in read.readings] == [111]
