"""Shared bits for benchmarks: a signer with a fresh key, best-of runs, process I/O counters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.clock import Clock
from agent.identity.signer import Signer
from agent.wire import cose


def make_signer(device_id: str = "gd-bench0000") -> Signer:
    key = ed25519.Ed25519PrivateKey.generate()
    return Signer(device_id, key, cose.key_id(key.public_key()), Clock())


def best_of(runs: int, fn: Callable[[], float]) -> float:
    """Best (highest) rate of several runs: the least disturbed by the rest of the machine."""
    return max(fn() for _ in range(runs))


def written_bytes() -> int:
    """Bytes this process passed to write(2) so far (``wchar``): what SQLite asked the file system to store."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
