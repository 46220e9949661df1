"""The release manifest (docs/updates.md): what the cloud signs for each agent package it ships.

Manifest: COSE_Sign1 by the cloud's *release key* (not the command key; pinned at provisioning as
``release.pub``) over a canonical CBOR map::

    {"v": 1, "name": str, "version": str, "format": "ipk" | "apk", "size": int, "sha256": bstr(32),
     "min_from": str, "downgrade": bool, "iat": int}

The signature's external AAD is ``RELEASE_AAD``: a release signature can never be taken for any other
signed message of the protocol, even were the same key ever used for two jobs.

Versions are dotted numbers with an optional package release (``0.1.0-1`` as opkg writes it,
``0.1.0-r1`` as apk writes it); ``version_key`` orders them and both spellings compare equal.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import cbor2

from agent.errors import CommandRejected, SignatureError
from agent.wire import cose

MANIFEST_VERSION = 1
RELEASE_AAD = b"glucoagent release manifest v1"
MAX_MANIFEST_BYTES = 4096
MAX_PACKAGE_BYTES = 64 * 1024 * 1024
FORMATS = ("ipk", "apk")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,5}(-r?[0-9]+)?$")
SHA256_BYTES = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    format: str
    size: int
    sha256: bytes
    min_from: str  # the oldest running version this package may replace
    downgrade: bool  # may replace a newer running version (a recall)
    issued_at: int


def version_key(version: str) -> tuple[int, ...]:
    """Order of versions: ``1.2.3-4`` < ``1.2.10-1``; ``-r4`` equals ``-4``; no release counts as 0."""
    if not VERSION_RE.match(version):
        raise ValueError(f"not a package version: {version!r}")
    upstream, _, release = version.partition("-")
    parts = [int(p) for p in upstream.split(".")]
    parts += [0] * (6 - len(parts))
    return (*parts, int(release.lstrip("r") or 0))


def _check(m: Manifest) -> None:
    if not NAME_RE.match(m.name):
        raise ValueError(f"bad package name {m.name!r}")
    for label, v in (("version", m.version), ("min_from", m.min_from)):
        if not VERSION_RE.match(v):
            raise ValueError(f"bad {label} {v!r}")
    if m.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if not 0 < m.size <= MAX_PACKAGE_BYTES:
        raise ValueError(f"size must be 1..{MAX_PACKAGE_BYTES}")
    if len(m.sha256) != SHA256_BYTES:
        raise ValueError("sha256 must be 32 bytes")


def manifest_body(m: Manifest) -> bytes:
    """The signed payload (canonical CBOR, so equal manifests are equal bytes)."""
    _check(m)
    body = {
        "v": MANIFEST_VERSION,
        "name": m.name,
        "version": m.version,
        "format": m.format,
        "size": m.size,
        "sha256": m.sha256,
        "min_from": m.min_from,
        "downgrade": m.downgrade,
        "iat": m.issued_at,
    }
    return cbor2.dumps(body, canonical=True)


def encode_manifest(key: cose.PrivateKey, m: Manifest) -> bytes:
    """Sign a manifest with the release key. Raises ValueError for a manifest the box would refuse."""
    return cose.sign1(key, manifest_body(m), external_aad=RELEASE_AAD)


def _field(body: Mapping[Any, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandRejected("bad_manifest", f"manifest field {name!r} must be {kind.__name__}")
    return value


def decode_manifest(data: bytes, release_key: cose.PublicKey) -> Manifest:
    """Verify the release signature, then the shape. Raises CommandRejected (bad_manifest, bad_signature)."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MANIFEST_BYTES:
        raise CommandRejected("bad_manifest", f"manifest must be at most {MAX_MANIFEST_BYTES} bytes")
    try:
        cose.parse_sign1(bytes(data))
    except SignatureError as exc:
        raise CommandRejected("bad_manifest", f"not a COSE_Sign1: {exc}") from None
    try:
        verified = cose.verify1(bytes(data), lambda _kid: release_key, external_aad=RELEASE_AAD)
    except SignatureError as exc:
        raise CommandRejected("bad_signature", f"release signature: {exc}") from None
    try:
        body = cbor2.loads(verified.payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise CommandRejected("bad_manifest", "manifest payload is not CBOR") from None
    if not isinstance(body, Mapping) or body.get("v") != MANIFEST_VERSION:
        raise CommandRejected("bad_manifest", f"manifest must be a map with v={MANIFEST_VERSION}")
    m = Manifest(
        name=_field(body, "name", str),
        version=_field(body, "version", str),
        format=_field(body, "format", str),
        size=_field(body, "size", int),
        sha256=_field(body, "sha256", bytes),
        min_from=_field(body, "min_from", str),
        downgrade=_field(body, "downgrade", bool),
        issued_at=_field(body, "iat", int),
    )
    try:
        _check(m)
    except ValueError as exc:
        raise CommandRejected("bad_manifest", str(exc)) from None
    return m


def check_applicable(m: Manifest, running: str) -> None:
    """May this box, running ``running``, install ``m``? Raises CommandRejected (too_old, downgrade, same_version)."""
    try:
        here = version_key(running)
    except ValueError:
        raise CommandRejected("bad_version", f"running version {running!r} cannot be compared") from None
    there = version_key(m.version)
    if here < version_key(m.min_from):
        raise CommandRejected("too_old", f"{m.version} updates from {m.min_from} or later; this box runs {running}")
    if there == here:
        raise CommandRejected("same_version", f"{running} already runs")
    if there < here and not m.downgrade:
        raise CommandRejected("downgrade", f"{m.version} is older than the running {running} and allows no downgrade")


# --- chunked delivery (a pull: the box asks for each chunk, so every chunk is acknowledged by the next ask) ---
CHUNK_BYTES = 32 * 1024  # well under mqtt.max_payload; a chunk costs one round trip
MAX_CHUNK_BYTES = 128 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRequest:
    sha256: bytes  # names the package (the manifest's digest)
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    sha256: bytes
    offset: int
    data: bytes


def encode_chunk_request(req: ChunkRequest) -> bytes:
    return cbor2.dumps({"v": 1, "sha256": req.sha256, "off": req.offset, "len": req.length}, canonical=True)


def encode_chunk(chunk: Chunk) -> bytes:
    return cbor2.dumps({"v": 1, "sha256": chunk.sha256, "off": chunk.offset, "data": chunk.data}, canonical=True)


def _map(payload: bytes, what: str) -> Mapping[Any, Any]:
    try:
        body = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise ValueError(f"{what} is not CBOR") from None
    if not isinstance(body, Mapping) or body.get("v") != 1:
        raise ValueError(f"{what} must be a map with v=1")
    return body


def _uint(body: Mapping[Any, Any], name: str, hi: int) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise ValueError(f"{name} must be an integer 0..{hi}")
    return value


def _digest(body: Mapping[Any, Any]) -> bytes:
    value = body.get("sha256")
    if not isinstance(value, bytes) or len(value) != SHA256_BYTES:
        raise ValueError("sha256 must be 32 bytes")
    return value


def decode_chunk_request(payload: bytes) -> ChunkRequest:
    """What the cloud reads from a box's fetch topic. Raises ValueError."""
    body = _map(payload, "chunk request")
    length = _uint(body, "len", MAX_CHUNK_BYTES)
    if length == 0:
        raise ValueError("len must be positive")
    return ChunkRequest(_digest(body), _uint(body, "off", MAX_PACKAGE_BYTES), length)


def decode_chunk(payload: bytes) -> Chunk:
    """What the box reads from its chunks topic. Raises ValueError (the box then asks again)."""
    body = _map(payload, "chunk")
    data = body.get("data")
    if not isinstance(data, bytes) or len(data) > MAX_CHUNK_BYTES:
        raise ValueError(f"data must be at most {MAX_CHUNK_BYTES} bytes")
    return Chunk(_digest(body), _uint(body, "off", MAX_PACKAGE_BYTES), data)
