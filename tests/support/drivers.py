"""Shared driver test helpers and fixtures: conformance vectors, meter and pen simulators on real ptys.

The conftest.py files under tests/unit/drivers and tests/system/drivers re-export the fixtures
(never import from a conftest: pytest loads each as its own module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from drivers.models import GlucoseReading
from drivers.simulators.base import Simulator
from drivers.simulators.faults import NO_FAULTS, Faults
from drivers.simulators.novopen import NO_FAULTS as PEN_NO_FAULTS
from drivers.simulators.novopen import Capture, PenFaults, PenLog, SimStats, serve
from drivers.simulators.pty_link import PtyLink
from drivers.simulators.run import make_simulator

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Vectors:
    """Conformance vectors under the root the session's ``vectors_dir`` fixture found (or skipped on)."""

    root: Path

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def json(self, *parts: str) -> Any:
        return json.loads(self.path(*parts).read_text())


@pytest.fixture
def vectors(vectors_dir: Path) -> Vectors:
    return Vectors(vectors_dir)


@pytest.fixture
def sim() -> Any:
    """``with sim(protocol, records, faults, baud=None, **kw) as (link, simulator): ...``"""
    return simulated


@contextlib.contextmanager
def simulated(
    protocol: str,
    records: Sequence[GlucoseReading],
    faults: Faults = NO_FAULTS,
    *,
    baud: float | None = None,
    **kwargs: Any,
) -> Iterator[tuple[str, Simulator]]:
    """A simulator thread on a fresh pty; yields (symlink path, simulator)."""
    with tempfile.TemporaryDirectory(prefix="gsim") as tmp:
        link = PtyLink(Path(tmp) / "ttyMETER")
        stop = threading.Event()
        sim = make_simulator(protocol, link, records, faults, baud=baud, stop_event=stop, **kwargs)
        thread = threading.Thread(target=sim.serve, kwargs={"poll_s": 0.01}, daemon=True)
        thread.start()
        try:
            yield str(link.link), sim
        finally:
            stop.set()
            thread.join(5)
            link.close()
            assert not thread.is_alive(), "simulator thread did not stop"


class ScriptedMeter:
    """The test plays the meter by hand on the master side of a real pty (literal bytes)."""

    def __init__(self, directory: str) -> None:
        self.link = PtyLink(Path(directory) / "ttySCRIPT")
        self.url = str(self.link.link)
        self.heard = bytearray()

    def expect(self, data: bytes, timeout: float = 5.0) -> None:
        """Wait until the host has written ``data`` (after anything heard before)."""
        import time

        deadline = time.monotonic() + timeout
        while data not in self.heard:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"host did not send {data!r}; heard {bytes(self.heard)!r}")
            self.heard += self.link.read(timeout=min(left, 0.05))
        del self.heard[: self.heard.index(data) + len(data)]

    def send(self, data: bytes) -> None:
        self.link.write(data)

    def close(self) -> None:
        self.link.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedMeter]:
    with tempfile.TemporaryDirectory(prefix="gscr") as tmp:
        meter = ScriptedMeter(tmp)
        try:
            yield meter
        finally:
            meter.close()


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a thread; returns a concurrent.futures.Future."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


@pytest.fixture
def run_in_thread() -> Any:
    return in_thread


# --- the pen ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def novopen_vectors(vectors_dir: Path) -> Path:
    return vectors_dir / "novopen"


@pytest.fixture(scope="session")
def apdus(novopen_vectors: Path) -> dict[str, Any]:
    return json.loads((novopen_vectors / "apdus.json").read_text())


@pytest.fixture(scope="session")
def capture_bytes(novopen_vectors: Path) -> bytes:
    return (novopen_vectors / "nvp_datatest.txt").read_bytes()


@pytest.fixture(scope="session")
def expected(novopen_vectors: Path) -> dict[str, Any]:
    return json.loads((novopen_vectors / "nvp_datatest.expected.json").read_text())


PenSimulator = Callable[..., contextlib.AbstractContextManager[tuple[str, SimStats]]]


@pytest.fixture
def simulator(tmp_path: Path) -> PenSimulator:
    """``with simulator(source, faults) as (port, stats):`` a reader + pen served on a pty."""

    @contextlib.contextmanager
    def run(source: PenLog | Capture, faults: PenFaults = PEN_NO_FAULTS) -> Iterator[tuple[str, SimStats]]:
        link = tmp_path / f"pen{len(list(tmp_path.iterdir()))}"
        pty = PtyLink(link)
        stop, stats = threading.Event(), SimStats()
        thread = threading.Thread(target=serve, args=(pty, source, faults, stop, stats), daemon=True)
        thread.start()
        try:
            yield str(link), stats
        finally:
            stop.set()
            thread.join(5)
            pty.close()
            assert not thread.is_alive(), "simulator did not stop"

    return run
