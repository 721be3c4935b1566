"""Percentiles and summaries from real samples (no interpolation, no histograms).

A percentile here is the nearest-rank value of the sorted samples, so every figure the bench
prints is a latency some request actually had; with fewer than 100 samples, p99 is the max.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]; raises on no samples rather than inventing one."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """n, p50, p90, p99 and max, multiplied by ``scale`` (seconds to milliseconds by default)."""
    return {
        "n": len(values),
        "p50_ms": percentile(values, 0.50) * scale,
        "p90_ms": percentile(values, 0.90) * scale,
        "p99_ms": percentile(values, 0.99) * scale,
        "max_ms": max(values) * scale,
    }


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))
