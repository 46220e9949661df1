"""Driver unit tests: the conformance vectors (fixtures live in tests/support/drivers.py)."""

from support.drivers import apdus, capture_bytes, expected, novopen_vectors, vectors

__all__ = ["apdus", "capture_bytes", "expected", "novopen_vectors", "vectors"]
