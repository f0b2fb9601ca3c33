"""Intervals over seeds: Student-t and percentile bootstrap means, paired ratios and differences between methods.

Every function returns an :class:`Interval`-like dict ``{"mean", "lo", "hi", "n", "method"}`` where ``method``
names the construction, so a report can state which interval it quotes. Inputs are per-seed values (n,) and,
for paired functions, two arrays aligned by seed.

Formulas (x_1..x_n per-seed values, level 1 - alpha):

* t-interval:         mean(x) +- t_{1-alpha/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof 1).
* bootstrap:          percentile interval of the means of ``resamples`` resamples of x with replacement:
                      [q_{alpha/2}, q_{1-alpha/2}] of the resampled means (seeded, reproducible).
* paired difference:  t-interval of d_k = a_k - b_k.
* paired ratio (t):   exp of the t-interval of log(a_k / b_k); its centre is the geometric mean ratio.
* paired ratio (boot): percentile interval of mean(a*) / mean(b*) over resamples of the seed indices k
                      (the same indices for a and b, so the pairing is kept).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
RESAMPLES = 10_000
BOOT_SEED = 0


def _values(x, name: str, min_n: int = 2) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size < min_n:
        raise ValueError(f"{name}: need at least {min_n} values, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: values must be finite")
    return a


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    return level


def t_interval(x, *, level: float = LEVEL) -> dict:
    """Student-t interval of the mean of ``x`` (n >= 2): mean +- t_{(1+level)/2, n-1} s / sqrt(n)."""
    a, level = _values(x, "x"), _level(level)
    n, m = a.size, float(a.mean())
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "method": f"t ({level:.0%})"}


def bootstrap_interval(x, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = BOOT_SEED) -> dict:
    """Percentile bootstrap interval of the mean of ``x``: quantiles (1 -+ level)/2 of resampled means."""
    a, level = _values(x, "x"), _level(level)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    means = a[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return {"mean": float(a.mean()), "lo": float(lo), "hi": float(hi), "n": a.size,
            "method": f"percentile bootstrap ({level:.0%}, {resamples} resamples)"}


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned by seed: shapes {a.shape} and {b.shape}")
    return a, b


def paired_difference_t(a, b, *, level: float = LEVEL) -> dict:
    """t-interval of the mean per-seed difference a_k - b_k."""
    a, b = _paired(a, b)
    out = t_interval(a - b, level=level)
    out["method"] = f"paired t ({level:.0%})"
    return out


def paired_ratio_t(a, b, *, level: float = LEVEL) -> dict:
    """exp of the t-interval of log(a_k / b_k) (a, b > 0): geometric-mean ratio and its interval."""
    a, b = _paired(a, b)
    if np.any(a <= 0) or np.any(b <= 0):
        raise ValueError("a, b: ratios need positive values")
    t = t_interval(np.log(a / b), level=level)
    return {"mean": math.exp(t["mean"]), "lo": math.exp(t["lo"]), "hi": math.exp(t["hi"]), "n": t["n"],
            "method": f"paired log-ratio t ({level:.0%})"}


def paired_ratio_bootstrap(a, b, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = BOOT_SEED) -> dict:
    """Percentile interval of mean(a[k*]) / mean(b[k*]) over resampled seed indices k* (pairs kept)."""
    a, b = _paired(a, b)
    level = _level(level)
    if np.any(b <= 0):
        raise ValueError("b: ratios need positive denominators")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    ratios = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    lo, hi = np.quantile(ratios, [0.5 - level / 2, 0.5 + level / 2])
    return {"mean": float(a.mean() / b.mean()), "lo": float(lo), "hi": float(hi), "n": a.size,
            "method": f"paired percentile bootstrap of the ratio of means ({level:.0%}, {resamples} resamples)"}


def single_value(x: float) -> dict:
    """One value in the interval dict's shape, without an interval (``lo = hi = nan``, ``n = 1``)."""
    return {"mean": float(x), "lo": math.nan, "hi": math.nan, "n": 1, "method": "one value, no interval"}


def format_interval(iv: dict, fmt: str = ".3f") -> str:
    """``mean [lo, hi]`` with ``fmt``; ``mean (1 seed, no interval)`` for :func:`single_value`."""
    if iv["n"] < 2:
        return f"{iv['mean']:{fmt}} (1 seed, no interval)"
    return f"{iv['mean']:{fmt}} [{iv['lo']:{fmt}}, {iv['hi']:{fmt}}]"
