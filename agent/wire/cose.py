"""COSE_Sign1 (RFC 9052 §4.2) signing and verification, with the policy we apply.

Policy: tag 18 always emitted and required; ``alg`` must sit in the protected
header; EdDSA (-8) and Ed25519 (-19) accepted for Ed25519 keys, ES256 (-7) for
P-256 keys with the raw r||s signature. The kid identifies the key; the caller
maps kid to a public key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

# The enums only, from where the serialization package itself takes them: that package also loads ssh,
# bcrypt and the ciphers, which the running box never needs (docs/field.md).
from cryptography.hazmat.primitives._serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import SignatureError

COSE_SIGN1_TAG = 18
HDR_ALG = 1
HDR_CRIT = 2
HDR_CONTENT_TYPE = 3
HDR_KID = 4
ALG_ES256 = -7
ALG_EDDSA = -8
ALG_ED25519 = -19
CONTEXT_SIGNATURE1 = "Signature1"
ES256_COORD = 32

# cryptography's ec (P-256: the other clouds' device keys) is imported only where such a key is in hand, so
# an Ed25519 box never holds it (docs/field.md); the aliases are for annotations only.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclasses.dataclass(frozen=True, slots=True)
class Verified:
    """A COSE_Sign1 whose signature checked out."""

    payload: bytes
    alg: int
    kid: bytes | None
    protected: Mapping[Any, Any]


def key_id(public_key: PublicKey) -> bytes:
    """kid = first 16 bytes of SHA-256 over the SubjectPublicKeyInfo (as in the certificate)."""
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()[:16]


def is_private_key(obj: object) -> TypeGuard[PrivateKey]:
    """An Ed25519 or EC private key (the kinds COSE here signs with)."""
    if isinstance(obj, ed25519.Ed25519PrivateKey):
        return True
    from cryptography.hazmat.primitives.asymmetric import ec  # not an Ed25519 key: see PrivateKey

    return isinstance(obj, ec.EllipticCurvePrivateKey)


def is_public_key(obj: object) -> TypeGuard[PublicKey]:
    """An Ed25519 or EC public key."""
    if isinstance(obj, ed25519.Ed25519PublicKey):
        return True
    from cryptography.hazmat.primitives.asymmetric import ec  # not an Ed25519 key: see PrivateKey

    return isinstance(obj, ec.EllipticCurvePublicKey)


def default_alg(key: PrivateKey | PublicKey) -> int:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ALG_EDDSA
    from cryptography.hazmat.primitives.asymmetric import ec  # not an Ed25519 key: see PrivateKey

    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return ALG_ES256
    raise SignatureError(f"unsupported key type for COSE: {type(key).__name__}")


def _sig_structure(protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    return cbor2.dumps([CONTEXT_SIGNATURE1, protected, external_aad, payload])


def sign1(
    key: PrivateKey,
    payload: bytes,
    *,
    kid: bytes | None = None,
    alg: int | None = None,
    content_type: int | None = None,
    external_aad: bytes = b"",
) -> bytes:
    """Return a tagged COSE_Sign1 over ``payload``."""
    alg = default_alg(key) if alg is None else alg
    header: dict[int, Any] = {HDR_ALG: alg}
    if content_type is not None:
        header[HDR_CONTENT_TYPE] = content_type
    protected = cbor2.dumps(header, canonical=True)
    tbs = _sig_structure(protected, external_aad, payload)
    if alg in (ALG_EDDSA, ALG_ED25519) and isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(tbs)
    elif alg == ALG_ES256 and not isinstance(key, ed25519.Ed25519PrivateKey):
        signature = _es256_sign(key, tbs)
    else:
        raise SignatureError(f"algorithm {alg} does not fit a {type(key).__name__}")
    unprotected = {HDR_KID: kid} if kid is not None else {}
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, unprotected, payload, signature]))


def _es256_sign(key: object, tbs: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec, utils  # not an Ed25519 key: see PrivateKey

    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"algorithm {ALG_ES256} does not fit a {type(key).__name__}")
    r, s = utils.decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(ES256_COORD, "big") + s.to_bytes(ES256_COORD, "big")


def _es256_verified(key: object, signature: bytes, tbs: bytes) -> bool:
    """False where a P-256 key and a 64-byte signature are not both there; InvalidSignature where they are
    and the signature does not verify."""
    from cryptography.hazmat.primitives.asymmetric import ec, utils  # not an Ed25519 key: see PrivateKey

    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
        return False
    if len(signature) != 2 * ES256_COORD:
        return False
    r = int.from_bytes(signature[:ES256_COORD], "big")
    s = int.from_bytes(signature[ES256_COORD:], "big")
    key.verify(utils.encode_dss_signature(r, s), tbs, ec.ECDSA(hashes.SHA256()))
    return True


def _loads_one(data: bytes) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error."""
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SignatureError(f"malformed CBOR: {exc}") from exc
    if fp.tell() != len(data):
        raise SignatureError(f"{len(data) - fp.tell()} trailing bytes after COSE_Sign1")
    return obj


def parse_sign1(data: bytes) -> tuple[bytes, Mapping[Any, Any], Mapping[Any, Any], bytes, bytes]:
    """Structural checks (verifier checklist 1-3). Returns protected bytes, both maps, payload, signature."""
    if not isinstance(data, bytes | bytearray):
        raise SignatureError(f"bytes expected, got {type(data).__name__}")
    obj = _loads_one(bytes(data))
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != COSE_SIGN1_TAG:
        raise SignatureError("not a tagged COSE_Sign1 (tag 18)")
    msg = obj.value
    if not isinstance(msg, Sequence) or isinstance(msg, str | bytes) or len(msg) != 4:
        raise SignatureError("COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = msg
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise SignatureError("bad header buckets")
    if not isinstance(payload, bytes):
        raise SignatureError("payload must be a byte string (detached payloads are not accepted)")
    if not isinstance(signature, bytes):
        raise SignatureError("signature must be a byte string")
    prot = _loads_one(protected) if protected else {}
    if not isinstance(prot, Mapping):
        raise SignatureError("protected header is not a map")
    if not prot:
        protected = b""  # an encoded empty map counts as h'' (RFC 9052 §3)
    if set(prot) & set(unprotected):
        raise SignatureError("a header label appears in both buckets")
    if HDR_CRIT in prot:
        raise SignatureError("critical headers are not supported")
    return protected, prot, unprotected, payload, signature


def verify1(
    data: bytes,
    key_for_kid: Callable[[bytes | None], PublicKey | None],
    *,
    external_aad: bytes = b"",
) -> Verified:
    """Check structure, algorithm policy and signature; return the payload only if all hold."""
    protected, prot, unprotected, payload, signature = parse_sign1(data)
    alg = prot.get(HDR_ALG)
    if alg is None:
        raise SignatureError("alg must be in the protected header")
    if alg not in (ALG_EDDSA, ALG_ED25519, ALG_ES256):
        raise SignatureError(f"algorithm not allowed: {alg!r}")
    kid = prot.get(HDR_KID, unprotected.get(HDR_KID))
    if kid is not None and not isinstance(kid, bytes):
        raise SignatureError("kid must be a byte string")
    key = key_for_kid(kid)
    if key is None:
        raise SignatureError(f"unknown kid {kid.hex() if kid else None}")
    tbs = _sig_structure(protected, external_aad, payload)
    try:
        if alg in (ALG_EDDSA, ALG_ED25519) and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, tbs)
        elif alg != ALG_ES256 or isinstance(key, ed25519.Ed25519PublicKey) or not _es256_verified(key, signature, tbs):
            raise SignatureError(f"algorithm {alg} does not fit a {type(key).__name__}")
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None
    return Verified(payload=payload, alg=alg, kid=kid, protected=prot)
