"""Rates of a yes/no outcome over n trials (e.g. generations showing a behaviour), with a Wilson interval.

The Wilson score interval (Wilson 1927) stays inside [0, 1] and keeps its coverage at 0 or n hits,
where the normal-approximation interval collapses to a point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel

Z95 = 1.959964


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default z)."""
    if n <= 0 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n and n > 0, got hits={hits}, n={n}")
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


class Rate(BaseModel):
    """hits of n, their share, and its 95% Wilson interval."""

    hits: int
    n: int
    rate: float
    ci95: tuple[float, float]

    @classmethod
    def of(cls, flags: Sequence[bool]) -> Rate:
        if not flags:
            raise ValueError("a rate needs at least one outcome")
        hits = sum(bool(flag) for flag in flags)
        return cls(hits=hits, n=len(flags), rate=hits / len(flags), ci95=wilson_interval(hits, len(flags)))


def rate_ratio(numerator: Rate, denominator: Rate) -> float | None:
    """numerator rate / denominator rate; None when the denominator rate is 0 (undefined)."""
    return None if denominator.rate == 0 else numerator.rate / denominator.rate
