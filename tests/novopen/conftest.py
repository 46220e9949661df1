"""Fixtures for the NovoPen stack: conformance vectors and a simulator on a real pty."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.simulators.novopen import NO_FAULTS, Capture, PenFaults, PenLog, SimStats, serve
from drivers.simulators.pty_link import PtyLink

REPO = Path(__file__).resolve().parents[2]


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


Simulator = Callable[..., contextlib.AbstractContextManager[tuple[str, SimStats]]]


@pytest.fixture
def simulator(tmp_path: Path) -> Simulator:
    """``with simulator(source, faults) as (port, stats):`` a reader + pen served on a pty."""

    @contextlib.contextmanager
    def run(source: PenLog | Capture, faults: PenFaults = NO_FAULTS) -> Iterator[tuple[str, SimStats]]:
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
