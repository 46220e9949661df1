"""Nothing of the agent's own: what meters and pens produce lives in drivers/models.py.

Kept only so ``agent/telemetry.py`` (being moved into ``agent/wire/`` on a parallel branch) still
imports; new code imports ``drivers.models``. Delete this module once nothing imports it.
"""

from __future__ import annotations

from drivers.models import GlucoseReading, InsulinDose

__all__ = ["GlucoseReading", "InsulinDose"]
