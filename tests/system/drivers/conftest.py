"""Driver system tests: simulators and scripted meters on real ptys (fixtures live in tests/support/drivers.py)."""

from support.drivers import capture_bytes, expected, novopen_vectors, run_in_thread, scripted, sim, simulator, vectors

__all__ = ["capture_bytes", "expected", "novopen_vectors", "run_in_thread", "scripted", "sim", "simulator", "vectors"]
