"""Confidence bounds of a proportion, shared by the gate (a candidate's win rate) and quality control (a
rater's gold accuracy)."""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_lower_bound(successes: float, n: int, level: float) -> float | None:
    """The one-sided lower bound of a proportion at ``level`` (Wilson's score interval; None for n = 0).

    ``successes`` may be fractional (a tie counts half a win): each outcome
    is then treated as a coin worth 0 or 1, whose variance is at least that
    of a half-win, so the bound errs low.
    """
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(level)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def wilson_upper_bound(successes: float, n: int, level: float) -> float | None:
    """The one-sided upper bound of a proportion at ``level``: one minus the lower bound of the failures."""
    lower = wilson_lower_bound(n - successes, n, level)
    return None if lower is None else 1.0 - lower
