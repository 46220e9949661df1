"""The device key at work: signing telemetry packs and command results (COSE_Sign1)."""

from __future__ import annotations

from collections.abc import Callable

from agent.clock import Clock
from agent.wire import cose, telemetry


class Signer:
    """Signs telemetry packs with the device key at the moment they are accepted."""

    def __init__(self, device_id: str, key: cose.PrivateKey, kid: bytes, clock: Clock) -> None:
        self.device_id = device_id
        self.key = key
        self.kid = kid
        self.clock = clock

    def builder(self, kind: telemetry.Kind, entries: list[dict[int, object]]) -> Callable[[int], bytes]:
        def build(seq: int) -> bytes:
            header = telemetry.Header(self.device_id, seq, kind, self.clock.now())
            payload = telemetry.encode(header, entries)
            return cose.sign1(self.key, payload, kid=self.kid, content_type=telemetry.SENML_CBOR_CONTENT_FORMAT)

        return build

    def sign_payload(self, payload: bytes) -> bytes:
        return cose.sign1(self.key, payload, kid=self.kid)
