"""Fault switches for the meter simulators: what a bad cable or a careless patient does.

All probabilities are per reply unit (a line, a frame or a packet). A fault plan is a
frozen value; the randomness comes from ``seed`` so a failing test can be replayed.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True, slots=True)
class Faults:
    noise: float = 0.0  # probability that random bytes are inserted into a unit
    drop: float = 0.0  # probability that one byte of a unit is lost
    bad_checksum: float = 0.0  # probability that a unit goes out with a wrong checksum
    repeat: float = 0.0  # probability that a unit is sent again as if its acknowledgement was lost
    slow_s: float = 0.0  # extra delay before every reply (must stay below the driver timeout)
    unplug_after: int | None = None  # cable pulled after this many records were sent
    switched_on: bool = False  # meter left switched on / not in data mode
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("noise", "drop", "bad_checksum", "repeat"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.{name}: expected a probability 0..1, got {value}")
        if self.slow_s < 0:
            raise ValueError(f"faults.slow_s: expected >= 0, got {self.slow_s}")
        if self.unplug_after is not None and self.unplug_after < 0:
            raise ValueError(f"faults.unplug_after: expected >= 0, got {self.unplug_after}")


NO_FAULTS = Faults()


class Mangler:
    """Applies the byte-level faults of a plan to outgoing units (stateful: owns the RNG)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)

    def bad_checksum(self) -> bool:
        return bool(self.faults.bad_checksum) and self.rng.random() < self.faults.bad_checksum

    def repeat(self) -> bool:
        return bool(self.faults.repeat) and self.rng.random() < self.faults.repeat

    def mangle(self, unit: bytes) -> bytes:
        data = bytearray(unit)
        if self.faults.noise and self.rng.random() < self.faults.noise:
            at = self.rng.randrange(len(data) + 1)
            data[at:at] = self.rng.randbytes(self.rng.randint(1, 4))
        if self.faults.drop and data and self.rng.random() < self.faults.drop:
            del data[self.rng.randrange(len(data))]
        return bytes(data)
