"""Shared helpers: conformance vectors and simulators served over real ptys."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.models import GlucoseReading
from drivers.simulators.base import Simulator
from drivers.simulators.faults import NO_FAULTS, Faults
from drivers.simulators.pty_link import PtyLink
from drivers.simulators.run import make_simulator

REPO = Path(__file__).resolve().parents[2]
VECTORS = Path(os.environ.get("GLUCOAGENT_VECTORS") or REPO.parent / "shared" / "vectors")


def vector_path(*parts: str) -> Path:
    path = VECTORS.joinpath(*parts)
    if not VECTORS.is_dir():
        pytest.skip("conformance vectors absent")
    return path


def vector_json(*parts: str) -> Any:
    return json.loads(vector_path(*parts).read_text())


class Vectors:
    """Conformance vectors; every use skips the test when the directory is absent."""

    def path(self, *parts: str) -> Path:
        return vector_path(*parts)

    def json(self, *parts: str) -> Any:
        return vector_json(*parts)


@pytest.fixture
def vectors() -> Vectors:
    return Vectors()


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
