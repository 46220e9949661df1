"""The release manifest: exact bytes, round trip, a signature by any other key or context refused, garbage refused."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import CMD_ID, DEV, KEY, NOW, OTHER

from agent.errors import CommandRejected
from agent.wire import command, cose, release

MANIFEST = release.Manifest("glucoagent", "0.2.0-1", "ipk", 123456, bytes(range(32)), "0.1.0", False, NOW)
# Computed once from the code; a change here changes what boxes in the field accept.
GOLDEN = bytes.fromhex(
    "d28443a10127a05885a9617601636961741a6955b900646e616d656a676c75636f6167656e746473697a651a0001e240"
    "66666f726d61746369706b667368613235365820000102030405060708090a0b0c0d0e0f101112131415161718191a1b"
    "1c1d1e1f6776657273696f6e67302e322e302d31686d696e5f66726f6d65302e312e3069646f776e6772616465f45840"
    "33f24969d92fdd460b8fdb655cdc73a2f19a1129b766aa15e74c2efc10f79cf019d1eb107dc6999c671630c1b1f33ca0"
    "c8943cbc39a221bc04f451829f7d630f"
)


def test_manifest_is_byte_exact() -> None:
    assert release.encode_manifest(KEY, MANIFEST) == GOLDEN


def test_round_trip() -> None:
    assert release.decode_manifest(GOLDEN, KEY.public_key()) == MANIFEST


def test_other_key_is_a_bad_signature() -> None:
    with pytest.raises(CommandRejected) as exc:
        release.decode_manifest(GOLDEN, OTHER.public_key())
    assert exc.value.code == "bad_signature"


def test_a_plain_signature_over_the_same_body_is_refused() -> None:
    """Without the release context (external AAD) the same key's signature does not count: no cross-use."""
    plain = cose.sign1(KEY, release.manifest_body(MANIFEST))
    with pytest.raises(CommandRejected) as exc:
        release.decode_manifest(plain, KEY.public_key())
    assert exc.value.code == "bad_signature"


def test_a_command_envelope_is_not_a_manifest() -> None:
    env = command.encode_command(KEY, CMD_ID, DEV, "ping", {}, issued_at=NOW, expires_at=NOW + 60)
    with pytest.raises(CommandRejected) as exc:
        release.decode_manifest(env, KEY.public_key())
    assert exc.value.code == "bad_signature"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": "deb"}, "format"),
        ({"size": 0}, "size"),
        ({"sha256": b"short"}, "sha256"),
        ({"version": "1.0; rm -rf /"}, "version"),
        ({"name": "../etc"}, "name"),
    ],
)
def test_invalid_fields_are_refused_at_both_ends(change: dict[str, object], field: str) -> None:
    bad = dataclasses.replace(MANIFEST, **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        release.encode_manifest(KEY, bad)
    body = cbor2.loads(release.manifest_body(MANIFEST))
    body.update(change)
    signed = cose.sign1(KEY, cbor2.dumps(body, canonical=True), external_aad=release.RELEASE_AAD)
    with pytest.raises(CommandRejected) as exc:
        release.decode_manifest(signed, KEY.public_key())
    assert exc.value.code == "bad_manifest"


def test_wrong_types_are_refused() -> None:
    body = cbor2.loads(release.manifest_body(MANIFEST))
    body["downgrade"] = 1
    signed = cose.sign1(KEY, cbor2.dumps(body, canonical=True), external_aad=release.RELEASE_AAD)
    with pytest.raises(CommandRejected, match="downgrade"):
        release.decode_manifest(signed, KEY.public_key())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_escapes(data: bytes) -> None:
    with pytest.raises(CommandRejected):
        release.decode_manifest(data, KEY.public_key())


def test_oversize_refused() -> None:
    with pytest.raises(CommandRejected, match="at most"):
        release.decode_manifest(b"\x00" * (release.MAX_MANIFEST_BYTES + 1), KEY.public_key())


@pytest.mark.parametrize(
    ("lower", "higher"),
    [("0.1.0-1", "0.1.0-2"), ("0.1.0-r9", "0.1.1-r1"), ("0.9.9", "0.10.0"), ("1", "1.0.0-1"), ("0", "0.0.1")],
)
def test_version_order(lower: str, higher: str) -> None:
    assert release.version_key(lower) < release.version_key(higher)


def test_opkg_and_apk_spellings_are_equal() -> None:
    assert release.version_key("0.1.0-1") == release.version_key("0.1.0-r1")


def test_applicability() -> None:
    release.check_applicable(MANIFEST, "0.1.0-1")  # an upgrade from min_from or later
    cases = [("0.0.9-1", "too_old"), ("0.2.0-r1", "same_version"), ("0.3.0-1", "downgrade"), ("x", "bad_version")]
    for running, code in cases:
        with pytest.raises(CommandRejected) as exc:
            release.check_applicable(MANIFEST, running)
        assert exc.value.code == code, running
    recall = dataclasses.replace(MANIFEST, downgrade=True)
    release.check_applicable(recall, "0.3.0-1")  # a recall: downgrade allowed by the signed manifest
