"""COSE_Sign1: the cose-wg vectors under our policy, our own signatures checked by pycose, and fuzzing."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import SignatureError
from agent.wire import cose

# file -> (verifies under our policy?, why). Policy: tag 18 required, alg protected, Ed25519/ES256 only.
EXPECTED = {
    "eddsa-examples/eddsa-sig-01.json": (True, "Ed25519"),
    "eddsa-examples/eddsa-sig-02.json": (False, "Ed448 is not an algorithm we accept"),
    "ecdsa-examples/ecdsa-sig-01.json": (True, "ES256"),
    "RFC8152/Appendix_C_2_1.json": (True, "ES256"),
    "CWT/A_3.json": (True, "ES256, empty unprotected map"),
    "sign1-tests/sign-pass-02.json": (True, "needs the external_aad"),
    "sign1-tests/sign-pass-03.json": (False, "untagged: policy requires tag 18"),
    "sign1-tests/sign-pass-01.json": (False, "alg unprotected: policy requires it protected"),
    "sign1-tests/sign-fail-01.json": (False, "tag 998"),
    "sign1-tests/sign-fail-02.json": (False, "payload changed"),
    "sign1-tests/sign-fail-03.json": (False, "alg -999"),
    "sign1-tests/sign-fail-04.json": (False, "alg 'unknown'"),
    "sign1-tests/sign-fail-06.json": (False, "protected header gained a label"),
    "sign1-tests/sign-fail-07.json": (False, "protected header lost a label"),
}


def _b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _public_key(jwk: dict[str, str]) -> cose.PublicKey | None:
    if jwk["kty"] == "OKP":
        if jwk["crv"] != "Ed25519":
            return None
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(jwk["x_hex"]))
    x = bytes.fromhex(jwk["x_hex"]) if "x_hex" in jwk else _b64(jwk["x"])
    y = bytes.fromhex(jwk["y_hex"]) if "y_hex" in jwk else _b64(jwk["y"])
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    ).public_key()


@pytest.fixture(scope="module")
def cose_dir(vectors_dir: Path) -> Path:
    return vectors_dir / "cose"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cose_wg_vectors_under_policy(cose_dir: Path, name: str) -> None:
    vector = json.loads((cose_dir / name).read_text())
    should_verify, why = EXPECTED[name]
    assert vector.get("fail", False) is False or not should_verify
    data = bytes.fromhex(vector["output"]["cbor"])
    key = _public_key(vector["input"]["sign0"]["key"])
    aad = bytes.fromhex(vector["input"]["sign0"].get("external", ""))
    if should_verify:
        result = cose.verify1(data, lambda _kid: key, external_aad=aad)
        plaintext = vector["input"].get("plaintext")
        expected = plaintext.encode() if plaintext is not None else bytes.fromhex(vector["input"]["plaintext_hex"])
        assert result.payload == expected, why
    else:
        with pytest.raises(SignatureError):
            cose.verify1(data, lambda _kid: key, external_aad=aad)


def test_external_aad_is_required_for_pass_02(cose_dir: Path) -> None:
    vector = json.loads((cose_dir / "sign1-tests/sign-pass-02.json").read_text())
    key = _public_key(vector["input"]["sign0"]["key"])
    with pytest.raises(SignatureError, match="does not verify"):
        cose.verify1(bytes.fromhex(vector["output"]["cbor"]), lambda _kid: key)


def test_empty_protected_map_is_signed_as_empty_bstr(cose_dir: Path) -> None:
    """sign-pass-01's Sig_structure uses h'' for the transported h'A0' (RFC 9052 §3)."""
    vector = json.loads((cose_dir / "sign1-tests/sign-pass-01.json").read_text())
    protected, prot, _unprot, payload, _sig = cose.parse_sign1(bytes.fromhex(vector["output"]["cbor"]))
    assert protected == b"" and prot == {}
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    assert tbs.hex().upper() == vector["intermediates"]["ToBeSign_hex"]


def test_ed25519_signature_is_byte_exact(cose_dir: Path) -> None:
    vector = json.loads((cose_dir / "eddsa-examples/eddsa-sig-01.json").read_text())
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["input"]["sign0"]["key"]["d_hex"]))
    ours = cose.sign1(key, b"This is the content.", kid=b"11", content_type=0)
    assert ours.hex().upper() == vector["output"]["cbor"]


@pytest.mark.parametrize("key", [ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())])
def test_our_signatures_verify_with_pycose(key: cose.PrivateKey) -> None:
    """An independent implementation (pycose) accepts what the device signs."""
    from pycose.keys import EC2Key, OKPKey
    from pycose.messages import Sign1Message

    payload = b"\x83\x01\x02\x03"
    kid = cose.key_id(key.public_key())
    data = cose.sign1(key, payload, kid=kid, content_type=112)
    msg = Sign1Message.decode(data)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes_raw()
        msg.key = OKPKey(crv="ED25519", x=raw)
    else:
        nums = key.public_key().public_numbers()
        msg.key = EC2Key(crv="P_256", x=nums.x.to_bytes(32, "big"), y=nums.y.to_bytes(32, "big"))
    assert msg.verify_signature()
    assert msg.payload == payload


def test_wrong_key_is_refused() -> None:
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    data = cose.sign1(key, b"x")
    with pytest.raises(SignatureError, match="does not verify"):
        cose.verify1(data, lambda _kid: other.public_key())


def test_ed25519_alg_minus_19_is_accepted() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    data = cose.sign1(key, b"x", alg=cose.ALG_ED25519)
    assert cose.verify1(data, lambda _kid: key.public_key()).alg == cose.ALG_ED25519


def test_trailing_bytes_are_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="trailing"):
        cose.verify1(cose.sign1(key, b"x") + b"\x00", lambda _kid: key.public_key())


_KEY = ed25519.Ed25519PrivateKey.generate()
_GOOD = cose.sign1(_KEY, b"payload", kid=b"k")


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_verifier(data: bytes) -> None:
    with contextlib.suppress(SignatureError):
        cose.verify1(data, lambda _kid: _KEY.public_key())


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=len(_GOOD) - 1), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_refused(pos: int, flip: int) -> None:
    """Every byte is covered: the signature, or (for the unprotected kid) the key lookup."""
    data = bytearray(_GOOD)
    data[pos] ^= flip
    with pytest.raises(SignatureError):
        cose.verify1(bytes(data), lambda kid: _KEY.public_key() if kid == b"k" else None)


def test_sign1_golden_bytes_without_the_conformance_vectors() -> None:
    """Our own encoding of a tagged COSE_Sign1 (kid unprotected, content type protected) is byte-stable."""
    from wire_golden import COSE_PLAIN, KEY

    assert cose.sign1(KEY, b"hello", kid=b"k1", content_type=112) == COSE_PLAIN
    verified = cose.verify1(COSE_PLAIN, lambda kid: KEY.public_key() if kid == b"k1" else None)
    assert (verified.payload, verified.kid, verified.alg) == (b"hello", b"k1", cose.ALG_EDDSA)
