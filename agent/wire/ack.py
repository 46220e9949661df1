"""The cloud's end-to-end ack (docs/mqtt.md): COSE_Sign1 by the command key over ``{"dev", "c", "h"}``.

``c`` and ``h`` list the sequence numbers of the clinical and the health stream that the cloud
has stored; the box deletes a buffered row only on such an ack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cbor2

from agent.errors import SignatureError
from agent.wire import cose

CLINICAL = "c"  # readings, doses, alerts (agent.buffer.store's stream names)
HEALTH = "h"
STREAMS = (CLINICAL, HEALTH)


def encode_ack(command_key: cose.PrivateKey, device_id: str, acks: Mapping[str, Sequence[int]]) -> bytes:
    """The signed ack for ``device_id``: stream -> stored sequence numbers."""
    return cose.sign1(command_key, cbor2.dumps({"dev": device_id, **acks}, canonical=True))


def decode_ack(data: bytes, command_key: cose.PublicKey, device_id: str) -> dict[str, list[int]]:
    """Verify and parse an ack addressed to ``device_id``; raises SignatureError."""
    verified = cose.verify1(data, lambda _kid: command_key)
    try:
        body = cbor2.loads(verified.payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SignatureError(f"ack payload is not CBOR: {exc}") from exc
    if not isinstance(body, dict) or body.get("dev") != device_id:
        raise SignatureError("ack is not addressed to this device")
    out: dict[str, list[int]] = {}
    for stream in STREAMS:
        seqs = body.get(stream, [])
        if not isinstance(seqs, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seqs):
            raise SignatureError(f"ack field {stream!r} is not a list of integers")
        out[stream] = seqs
    return out
