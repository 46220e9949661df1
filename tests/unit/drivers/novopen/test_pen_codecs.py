"""Each layer's codec against literal wire bytes and the upstream APDU vectors (apdus.json)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from drivers.errors import InvalidChecksum, InvalidResponse
from drivers.novopen import ieee11073 as apdu
from drivers.novopen import phd, pmstore, pn532, type4


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# --- PN532 -------------------------------------------------------------------------------------------
def test_pn532_frames_are_the_documented_bytes() -> None:
    assert pn532.encode_frame(pn532.sam_configuration()) == h("00 00 FF 05 FB D4 14 01 14 01 02 00")
    assert pn532.encode_frame(pn532.get_firmware_version()) == h("00 00 FF 02 FE D4 02 2A 00")
    assert pn532.encode_frame(pn532.in_list_passive_target()) == h("00 00 FF 04 FC D4 4A 01 00 E1 00")
    assert h("00 00 FF 00 FF 00") == pn532.ACK_FRAME
    assert h("00 00 FF FF 00 00") == pn532.NACK_FRAME


def test_pn532_decodes_reply_and_tokens_in_a_stream() -> None:
    reply = h("00 00 FF 06 FA D5 03 32 01 06 07 E8 00")
    assert pn532.decode_frame(reply) == pn532.Frame(pn532.TFI_READER, 0x03, h("32 01 06 07"))
    splitter = pn532.FrameSplitter()
    stream = h("55 55 00 00") + pn532.ACK_FRAME + reply + pn532.ERROR_FRAME
    tokens = []
    for byte in stream:  # one byte at a time: nothing may depend on read boundaries
        tokens += splitter.feed(bytes((byte,)))
    assert tokens == [pn532.Ack(), pn532.Frame(pn532.TFI_READER, 0x03, h("32 01 06 07")), pn532.ErrorFrame()]


def test_pn532_extended_frame_round_trip() -> None:
    frame = pn532.Frame(pn532.TFI_READER, 0x41, bytes(range(256)) + b"\x90\x00")
    wire = pn532.encode_frame(frame)
    assert wire[:8] == h("00 00 FF FF FF 01 04 FB")  # LEN 0x0104 = TFI + cmd + 258, LCS
    assert pn532.decode_frame(wire) == frame


def test_pn532_bad_dcs_and_lcs_are_typed_errors() -> None:
    wire = bytearray(pn532.encode_frame(pn532.in_data_exchange(h("00 B0 00 00 02"))))
    wire[-2] ^= 0x01
    with pytest.raises(InvalidChecksum) as caught:
        pn532.decode_frame(bytes(wire))
    assert caught.value.wire == wire[-2]
    with pytest.raises(InvalidChecksum):
        pn532.decode_frame(h("00 00 FF 05 FA D4 14 01 14 01 02 00"))  # LCS off by one


def test_pn532_target_and_status() -> None:
    params = h("01 01 00 04 20 07 04A1B2C3D4E5F6 05 78 80 70 02")
    target = pn532.parse_in_list_passive_target(params)
    assert target is not None and target.iso_dep and target.uid == h("04A1B2C3D4E5F6")
    assert pn532.encode_target(target) == params
    assert pn532.parse_in_list_passive_target(b"\x00") is None
    assert pn532.exchange_status_error(0x00) is None
    assert isinstance(pn532.exchange_status_error(0x01), pn532.PenRemoved)
    assert isinstance(pn532.exchange_status_error(0x2B), pn532.PenRemoved)
    error = pn532.exchange_status_error(0x02)
    assert isinstance(error, pn532.Pn532Error) and not isinstance(error, pn532.PenRemoved)


# --- Type 4 ---------------------------------------------------------------------------------------
def test_type4_commands_are_the_documented_bytes() -> None:
    assert type4.select_application() == h("00 A4 04 00 07 D2 76 00 00 85 01 01 00")
    assert type4.select_file(type4.CC_FILE_ID) == h("00 A4 00 0C 02 E1 03")
    assert type4.select_file(type4.NDEF_FILE_ID) == h("00 A4 00 0C 02 E1 04")
    assert type4.read_binary(0, 0x0F) == h("00 B0 00 00 0F")
    assert type4.read_binary(2 + 255, 4) == h("00 B0 01 01 04")
    assert type4.write_ndef(phd.EMPTY_RECORD) == h("00 D6 00 00 05 00 03 D0 00 00")


def test_type4_cc_and_status_words() -> None:
    cc = type4.parse_cc(type4.parse_rapdu(h("00 0F 20 01 0C 01 0C 04 06 E1 04 01 0C 00 00 90 00")))
    assert (cc.max_le, cc.max_lc, cc.ndef_file_id, cc.ndef_max_size, cc.read_chunk) == (268, 268, 0xE104, 268, 255)
    assert type4.encode_cc(cc) == h("00 0F 20 01 0C 01 0C 04 06 E1 04 01 0C 00 00")
    with pytest.raises(type4.Type4Error) as caught:
        type4.parse_rapdu(h("6A 82"))
    assert caught.value.sw == 0x6A82
    with pytest.raises(type4.Type4Error):
        type4.parse_rapdu(b"\x90")


# --- PHD ----------------------------------------------------------------------------------------------
def test_phd_vectors(apdus: dict[str, Any]) -> None:
    vec = apdus["xdrip_PHDllTest"]
    inner = h(vec["encode"]["input"]["inner_hex"])
    assert phd.encode_phd(vec["encode"]["input"]["seq"], inner).hex() == vec["encode"]["expected_hex"]
    packet = phd.decode_phd(h(vec["parse"]["frame_hex"]))
    want = vec["parse"]["expected"]
    assert (packet.seq, packet.seq_byte, len(packet.apdu)) == (want["seq"], want["chk"], want["payloadLen"])
    assert packet.apdu.hex() == want["inner_hex"]


def test_phd_rejects_other_records() -> None:
    with pytest.raises(phd.PhdError):
        phd.decode_phd(h("D1 01 03 54 02 65 6E"))  # a Text record
    with pytest.raises(phd.PhdError):
        phd.decode_phd(h("D1 03 08 50 48 44 87 0E"))  # payload cut short


# --- IEEE 11073 FLOAT -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (0xFF000014, Decimal("2.0")),
        (0xFF0001A4, Decimal("42.0")),
        (0xFF0001AE, Decimal("43.0")),
        (0x00000005, Decimal(5)),
        (0xFEFFFFFF, Decimal("-0.01")),
        (0x007FFFFF, pmstore.FloatSpecial.NAN),
        (0x00800000, pmstore.FloatSpecial.NRES),
        (0x007FFFFE, pmstore.FloatSpecial.PLUS_INFINITY),
    ],
)
def test_float(raw: int, value: Decimal | pmstore.FloatSpecial) -> None:
    assert pmstore.decode_float(raw) == value
    assert pmstore.decode_float(pmstore.encode_float(value)) == value


# --- IEEE 11073 APDUs: every vector of apdus.json -------------------------------------------------------------
def phd_apdu(hex_text: str) -> bytes:
    data = h(hex_text)
    if data.endswith(b"\x90\x00") and data[2] + 6 == len(data) - 2:
        data = type4.parse_rapdu(data)
    return phd.decode_phd(data).apdu


def test_nvp_config_report(apdus: dict[str, Any]) -> None:
    vec = apdus["nov_open_reader_DataApduTest"]["APDU_EVENT_REPORT"]
    raw = phd_apdu(vec["hex"])
    data = apdu.decode_data_apdu(raw)
    report = pmstore.decode_event_report(data)
    config = pmstore.decode_config_report(report)
    want = vec["expected"]
    assert (config.config_id, config.segment_count, config.store_usage) == (
        want["config_id"],
        want["nbSegment"],
        want["totalEntries"],
    )
    assert (config.unit_code, config.store_capacity) == (want["unitCode"], want["totalStorage"])
    assert pmstore.encode_config_report(config) == report.info
    assert pmstore.encode_event_report(data.invoke_id, report) == raw


def test_nvp_specification_segment_info_and_dose_list(apdus: dict[str, Any]) -> None:
    vecs = apdus["nov_open_reader_DataApduTest"]
    mds = pmstore.decode_mds(apdu.decode_data_apdu(phd_apdu(vecs["APDU_SPECIFICATION"]["hex"])))
    assert (mds.serial, mds.sw_revision) == ("ABGPVI", "01.08.01")
    action = pmstore.decode_action(apdu.decode_data_apdu(phd_apdu(vecs["APDU_SEGMENT_INFO"]["hex"])), result=True)
    segments = pmstore.decode_segment_info(action)
    assert len(segments) == vecs["APDU_SEGMENT_INFO"]["expected"]["segments"]
    assert len(segments[0].attributes) == vecs["APDU_SEGMENT_INFO"]["expected"]["attributes_in_segment_0"]
    assert (segments[0].instance, segments[0].label, segments[0].entry_size()) == (16, "Dose Log", 12)
    assert pmstore.encode_segment_info(segments) == action.data
    raw = phd_apdu(vecs["APDU_DOSE_LIST"]["hex"])
    check_segment_data(raw, vecs["APDU_DOSE_LIST"]["parsed"])
    data = pmstore.decode_segment_data(pmstore.decode_event_report(apdu.decode_data_apdu(raw)))
    assert len(data.entries) == vecs["APDU_DOSE_LIST"]["expected"]["dose_count"]
    assert (
        pmstore.decode_float(data.entries[0].units_raw) * 10 == vecs["APDU_DOSE_LIST"]["expected"]["first_units_tenths"]
    )


def check_segment_data(raw: bytes, parsed: dict[str, Any]) -> None:
    data_apdu = apdu.decode_data_apdu(raw)
    report = pmstore.decode_event_report(data_apdu)
    data = pmstore.decode_segment_data(report)
    assert data_apdu.invoke_id == int(parsed["invoke_id"], 16)
    assert data_apdu.choice == int(parsed["data_choice"], 16)
    assert report.handle == parsed["obj_handle"]
    assert data.report_time == parsed["report_relative_time_s"]
    assert (data.instance, data.first_index, len(data.entries)) == (
        parsed["segment_instance"],
        parsed["first_entry_index"],
        parsed["entry_count"],
    )
    assert data.status == int(parsed["segm_evt_status"], 16)
    for entry, want in zip(data.entries, parsed["entries"], strict=True):
        assert entry.relative_time == want["relative_time_s"]
        assert f"{entry.units_raw:08X}" == want["units_raw_hex"]
        assert f"{entry.flags:08X}" == want["flags_hex"]
        value = pmstore.decode_float(entry.units_raw)
        if want["units"] is None:
            assert value is pmstore.FloatSpecial.NAN
        else:
            assert value == Decimal(str(want["units"]))
        assert data.report_time - entry.relative_time == want["seconds_before_report"]
    assert pmstore.encode_segment_data(data_apdu.invoke_id, data) == raw


def test_nvp_host_requests(apdus: dict[str, Any]) -> None:
    vecs = apdus["nov_open_reader_DataApduTest"]
    assert pmstore.accept_config(0, 0x400A).hex() == vecs["encode_event_request_accept_config"]["hex"]
    assert pmstore.get_mds_attributes(1, handle=55).hex() == vecs["encode_get_all_attributes"]["hex"]
    payload = apdu.decode_data_apdu(pmstore.segment_info_request(0)).payload
    assert payload.hex() == apdus["nov_open_reader_ConfirmedActionTest"]["hex"]


def test_xdrip_association(apdus: dict[str, Any]) -> None:
    vecs = apdus["xdrip_MessageTest"]
    raw = h(vecs["A_REQUEST (pen->reader association request AARQ)"]["hex"])
    aarq = apdu.decode_aarq(raw)
    want = vecs["A_REQUEST (pen->reader association request AARQ)"]["expected"]
    assert aarq.info.system_type == int(want["apoep_system_type"].split()[0], 16)
    assert (aarq.info.protocol_version, aarq.info.nomenclature_version) == (want["version"], want["nomenclature"])
    assert aarq.info.encoding_rules == want["encoding"]
    assert aarq.info.options[:2] == want["olist_count"].to_bytes(2, "big")
    assert apdu.encode_aarq(aarq) == raw
    aare = apdu.encode_aare(apdu.aare_for(aarq))
    assert aare.hex() == vecs["A_RESPONSE (reader->pen AARE, built from A_REQUEST)"]["hex"]
    decoded = apdu.decode_aare(aare)
    assert (decoded.result, decoded.data_proto_id, decoded.info.system_type) == (0x0003, 0x5079, 0x80000000)


def test_xdrip_config_get_and_segments(apdus: dict[str, Any]) -> None:
    vecs = apdus["xdrip_MessageTest"]
    config = pmstore.decode_config_report(
        pmstore.decode_event_report(apdu.decode_data_apdu(h(vecs["C_REPORT (pen config event report)"]["hex"])))
    )
    assert config.store_capacity == vecs["C_REPORT (pen config event report)"]["expected"]["total_storage_capacity"]
    accept = vecs["C_ACCEPT (reader accepts config)"]
    assert pmstore.accept_config(0, config.config_id).hex() == accept["hex"]
    result = pmstore.decode_event_result(apdu.decode_data_apdu(h(accept["hex"])))
    want = accept["expected"]
    assert (result.event_time, result.handle, result.event_type, len(result.info)) == (
        want["currentTime"],
        want["handle"],
        want["type"],
        want["replyLen"],
    )
    assert result.info == want["reportId"].to_bytes(2, "big") + want["reportResult"].to_bytes(2, "big")
    assert pmstore.get_mds_attributes(0).hex() == vecs["A_INFO (reader GET all MDS attributes)"]["hex"]
    info = vecs["D_INFO (pen MDS attributes)"]
    data = apdu.decode_data_apdu(h(info["hex"]))
    mds = pmstore.decode_mds(data)
    want = info["expected"]
    assert data.invoke_id == want["invoke_id"]
    assert (mds.serial, mds.sw_revision, mds.part_number) == (
        want["serial"],
        want["software_revision"],
        want["part_number"],
    )
    assert (mds.relative_time, f"{mds.manufacturer} {mds.model}") == (want["relative_time_s"], want["model"])
    assert pmstore.segment_info_request(1).hex() == vecs["CA_SEG (reader asks segment info, invoke 1)"]["hex"]
    sinfo = vecs["S_INFO (pen segment info)"]
    segments = pmstore.decode_segment_info(pmstore.decode_action(apdu.decode_data_apdu(h(sinfo["hex"])), result=True))
    assert (len(segments), segments[0].instance) == (sinfo["expected"]["segment_count"], sinfo["expected"]["instnum"])
    assert segments[0].entry_size() == pmstore.DOSE_ENTRY_SIZE  # "typical" layout
    assert (
        pmstore.trigger_transfer(2, 16).hex()
        == vecs["T_XFER (reader triggers transfer of segment 16, invoke 2)"]["hex"]
    )
    trig = pmstore.decode_action(
        apdu.decode_data_apdu(h(vecs["TRIG_SEG_REPLY (pen: segment 16, response code 0)"]["hex"])), result=True
    )
    assert pmstore.decode_trigger_result(trig) == (16, 0)


def test_xdrip_segment_data_with_invalid_entry_and_confirmations(apdus: dict[str, Any]) -> None:
    vecs = apdus["xdrip_MessageTest"]
    vec = vecs["SEGMENT_DATA (pen dose report, 3 entries)"]
    raw = h(vec["hex"])
    check_segment_data(raw, vec["parsed"])
    data = pmstore.decode_segment_data(pmstore.decode_event_report(apdu.decode_data_apdu(raw)))
    assert pmstore.decode_float(data.entries[0].units_raw) == Decimal(str(vec["expected"]["doses[0].units"]))
    two = pmstore.SegmentData(0, 16, 0, 0, data.entries[:2])
    assert (
        pmstore.confirm_segment_data(0x8001, two).hex() == vecs["ACK1 (reader confirms segment data, count 2)"]["hex"]
    )
    eighteen = pmstore.SegmentData(0, 16, 0, 0, (data.entries[0],) * 18)
    assert (
        pmstore.confirm_segment_data(0x8001, eighteen).hex()
        == vecs["ACK2 (reader confirms segment data, count 0x12)"]["hex"]
    )


def test_xdrip_invalid_entry_is_rejected_by_the_dose_rules(apdus: dict[str, Any]) -> None:
    from drivers.novopen.doses import interpret

    raw = h(apdus["xdrip_MessageTest"]["SEGMENT_DATA (pen dose report, 3 entries)"]["hex"])
    data = pmstore.decode_segment_data(pmstore.decode_event_report(apdu.decode_data_apdu(raw)))
    items = interpret([data])
    assert [i.valid for i in items] == [True, True, False]
    assert items[2].units is None and "NAN" in (items[2].reason or "")


def test_data_apdu_errors_are_typed() -> None:
    with pytest.raises(apdu.Ieee11073Error):
        apdu.decode_apdu(h("E7 00 00 10 00"))  # length beyond the data
    with pytest.raises(apdu.Ieee11073Error):
        apdu.decode_apdu(h("12 34 00 00"))  # unknown choice
    roer = apdu.encode_data_apdu(apdu.DataApdu(1, apdu.DataChoice.ROER, h("00 02 00 00")))
    with pytest.raises(apdu.Ieee11073Error, match="error result"):
        apdu.decode_data_apdu(roer)
    with pytest.raises(InvalidResponse):
        apdu.decode_aarq(apdu.release_request())
