"""The upload batch: a CBOR array of COSE_Sign1 byte strings, each record signed on its own.

The box packs pending records into one message (agent/link/uplink.py); the cloud unpacks it
before verifying each record alone (backend/ingest.py), so one bad record never spoils the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import cbor2

from agent.errors import GlucoagentError

MAX_ITEMS = 1000  # records the cloud accepts in one batch


class BatchError(GlucoagentError):
    """A telemetry message that is not a batch: not CBOR, not an array, or too many items."""


def encode_batch(records: Sequence[bytes]) -> bytes:
    """The message for these signed records (each a COSE_Sign1 as stored in the buffer)."""
    return cbor2.dumps(list(records))


def cbor_head(n: int) -> int:
    """Bytes of a CBOR head (major type + length) for a length of ``n``."""
    return 1 if n < 24 else 2 if n < 256 else 3 if n < 65_536 else 5 if n < 2**32 else 9


def batch_size(cose_lengths: Sequence[int]) -> int:
    """Exactly ``len(encode_batch(records))`` for records of these sizes (cut batches without encoding)."""
    return cbor_head(len(cose_lengths)) + sum(cbor_head(n) + n for n in cose_lengths)


def decode_batch(payload: bytes, max_items: int = MAX_ITEMS) -> list[object]:
    """The items of a batch, unverified: each must still be checked as a COSE_Sign1 on its own."""
    try:
        items = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BatchError(f"telemetry batch is not CBOR: {exc}") from None
    if not isinstance(items, list):
        raise BatchError(f"telemetry batch is a {type(items).__name__}, not an array")
    if len(items) > max_items:
        raise BatchError(f"telemetry batch of {len(items)} records (at most {max_items})")
    return items
