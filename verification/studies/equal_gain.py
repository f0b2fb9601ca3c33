"""Comparisons across the report's runs (built on ``proma.rl.summary.summarize_run``): KL at equal reward gain."""
from __future__ import annotations

import math

import numpy as np


def kl_at_equal_gain(points_a: list, points_b: list) -> dict | None:
    """Mean local KL of two methods interpolated at a common reward gain.

    ``points_*``: ``[(reward_gain, mean_local_kl)]`` over learning rates. Uses the overlap of the two gain
    ranges (only positive gains); within it, the midpoint, with KL interpolated linearly in the gain between
    the method's own learning rates (log KL). Returns None when the ranges do not overlap.
    """
    def clean(points):
        return sorted((g, k) for g, k in points if math.isfinite(g) and math.isfinite(k) and g > 0 and k > 0)

    a, b = clean(points_a), clean(points_b)
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if lo > hi:
        return None
    target = 0.5 * (lo + hi)

    def interp(points):
        gains = [g for g, _ in points]
        logs = [math.log(k) for _, k in points]
        return math.exp(float(np.interp(target, gains, logs)))

    return {"gain": target, "kl_a": interp(a), "kl_b": interp(b)}
