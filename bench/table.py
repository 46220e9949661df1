"""One row format for every benchmark, printed and written to docs/performance.md."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    figure: str  # what is measured, with its unit
    ours: float
    baseline: float | None  # measured in the same run; None when the figure has no baseline
    goal: str  # e.g. ">= 0.5x", "<= 2048 B"
    met: bool | None  # None: reported, not a gate
    baseline_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.ours / self.baseline
