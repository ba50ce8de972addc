"""Percentiles and the median (min-max) of a few rounds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

EN_DASH = "\u2013"


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """One figure over the rounds of a run: its median, and the lowest and highest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(finite), min(finite), max(finite))

    def fmt(self, digits: int = 1, *, sign: bool = False, suffix: str = "") -> str:
        if math.isnan(self.median):
            return "n/a"
        spec = f"{'+' if sign else ''}.{digits}f"
        return f"{self.median:{spec}}{suffix} ({self.low:{spec}}{EN_DASH}{self.high:{spec}})"
