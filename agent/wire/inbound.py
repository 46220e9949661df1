"""What arrived on the commands topic: one classification that checks the signature once.

A message there is a command envelope (agent.wire.command) or a certificate delivery
(agent.wire.renewal); both are COSE_Sign1 by the command key. ``classify`` checks size,
structure and signature once, then the body, and returns a typed outcome that the executor
passes on. The expiry rule needs the box's clock and the journal's cloud time floor and runs
after the journal's replay check, so it stays a separate pure step
(``agent.wire.command.check_expiry``) on the verified ``Command``.
"""

from __future__ import annotations

import dataclasses

from agent.errors import CommandRejected
from agent.wire import cose
from agent.wire.command import ID_RE, MAX_COMMAND_BYTES, Command, command_from_body, verified_body
from agent.wire.renewal import MAX_DELIVERY_BYTES, Delivery, delivery_from_body, is_delivery_body

MAX_INBOUND_BYTES = max(MAX_COMMAND_BYTES, MAX_DELIVERY_BYTES)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A message refused before it ran. ``cmd_id`` is the id its verified body claims ('' if none or
    unverified); ``delivery`` says the message was a (bad) certificate delivery, not a command."""

    error: CommandRejected
    cmd_id: str = ""
    verified: bool = False
    delivery: bool = False

    @property
    def code(self) -> str:
        return self.error.code


Inbound = Command | Delivery | Refusal


def classify(payload: bytes, command_key: cose.PublicKey, device_id: str) -> Inbound:
    """A command, a certificate delivery, or a refusal with its reason. Never raises for bad input."""
    try:
        body = verified_body(payload, command_key, MAX_INBOUND_BYTES)
    except CommandRejected as exc:
        return Refusal(exc)
    claimed = body.get("id")
    cmd_id = claimed if isinstance(claimed, str) and ID_RE.match(claimed) else ""
    try:
        if is_delivery_body(body):
            return delivery_from_body(body, device_id)
        return command_from_body(body, device_id)
    except CommandRejected as exc:
        return Refusal(exc, cmd_id, verified=True, delivery=is_delivery_body(body))
