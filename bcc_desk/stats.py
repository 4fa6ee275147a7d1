"""Confidence intervals, for every share a lab reads (a slide's verdict, a model's accuracy)."""

from __future__ import annotations

import math
from statistics import NormalDist

_Z95 = NormalDist().inv_cdf(0.975)


def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of the share k/n.  Hand-written (five lines)
    rather than pulling scipy into the application: `tests/test_verdict.py` checks it against
    scipy's `binomtest(...).proportion_ci(method="wilson")`."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a share needs 0 <= k <= n and n > 0, not {k} of {n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
