"""Confidence intervals for the query layer: Student's t over samples and Wilson's score interval for a proportion.

Pure math on floats (no pandas, no database), so every reader gets its intervals from store/queries.py and none
computes its own. Exact to float precision; scipy is not a dependency.
"""

from __future__ import annotations

import functools
import math

LEVEL = 0.95


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < epsilon:
            return result
    raise ArithmeticError(f"incomplete beta ({a}, {b}, {x}) did not converge")


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.cache
def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` >= 1 degrees of freedom (bisection on t_cdf)."""
    if df < 1:
        raise ValueError(f"df = {df} < 1: a t interval needs at least two samples")
    if not 0.5 <= probability < 1.0:
        raise ValueError(f"probability = {probability}: give an upper quantile in [0.5, 1)")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def t_half_width(std: float | None, n: int | None, level: float = LEVEL) -> float:
    """Half the width of the two-sided t interval of a mean: t_{(1+level)/2, n-1} * std / sqrt(n); NaN for n < 2 or
    a missing std (one sample has no spread to estimate)."""
    if n is None or std is None or not n >= 2 or math.isnan(std):
        return math.nan
    n = int(n)
    return t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)


def wilson_interval(successes: float, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a proportion (successes may be fractional: a mean score times trials)."""
    if trials < 1:
        return math.nan, math.nan
    z = _normal_quantile((1.0 + level) / 2.0)
    share = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    spread = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - spread)  # exact ends: none or all found
    high = 1.0 if successes >= trials else min(1.0, centre + spread)
    return low, high


def _normal_quantile(probability: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(probability)
