"""Confidence intervals of proportions: what a count of images can and cannot show.

Plain math, shared by the accuracy gate of compiled forms (`perito_core.models.gate`: top-1
agreement with model.pt and the accuracy change on held-out images) and by model comparison
(`perito_core.models.comparison`: a shadow's or an offline comparison's agreement).
"""

from __future__ import annotations

import math

# The standard normal quantile of a two-sided 95% interval.
Z_95 = 1.959964


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson, JASA 1927), 95% by default.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or `trials`
    successes: 32 of 32 gives about (0.893, 1.0).

    Args:
        successes: the count of successes, 0 <= successes <= trials.
        trials: the count of trials.
        z: the standard normal quantile of the interval (1.96: 95% two-sided).

    Returns:
        (lower, upper) in [0, 1]; (0, 1) for no trials.
    """
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(
    both: int, first_only: int, second_only: int, neither: int, z: float = Z_95
) -> tuple[float, float]:
    """The interval of p1 - p2, two proportions measured on the same items (a paired 2x2
    table), by Newcombe's square-and-add of Wilson intervals with the correlation correction
    (Newcombe, "Improved confidence intervals for the difference between binomial proportions
    based on paired data", Statistics in Medicine 17, 1998, method 10).

    For the gate: the first proportion is a compiled form's accuracy on held-out images, the
    second model.pt's on the same images, so the interval is the accuracy change's. Only the
    discordant images (`first_only`, `second_only`) move the estimate; the concordant ones
    narrow the interval through the correlation of the two.

    Args:
        both: items where both succeed (both classify right).
        first_only: items where only the first succeeds.
        second_only: items where only the second succeeds.
        neither: items where neither does. All counts >= 0.

    Returns:
        (lower, upper) of p1 - p2, within [-1, 1]; (-1, 1) for no items.
    """
    n = both + first_only + second_only + neither
    if n <= 0:
        return -1.0, 1.0
    first, second = both + first_only, both + second_only
    p1, p2 = first / n, second / n
    l1, u1 = wilson_interval(first, n, z)
    l2, u2 = wilson_interval(second, n, z)
    # The phi coefficient of the table, corrected for continuity as Newcombe's method 10 does:
    # a positive numerator under n/2 counts as no correlation.
    margins = first * (n - first) * second * (n - second)
    phi = 0.0
    if margins > 0:
        numerator = both * neither - first_only * second_only
        if numerator > n / 2:
            phi = (numerator - n / 2) / math.sqrt(margins)
        elif numerator < 0:
            phi = numerator / math.sqrt(margins)
    difference = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    lower = difference - math.sqrt(max(below, 0.0))
    upper = difference + math.sqrt(max(above, 0.0))
    return max(-1.0, lower), min(1.0, upper)
