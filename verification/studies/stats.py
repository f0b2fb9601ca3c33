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


def t_half_widths(a, *, level: float = LEVEL) -> np.ndarray:
    """Column-wise half widths of the t-interval of the mean: t_{(1+level)/2, n-1} s_j / sqrt(n) for ``a`` (n, S)."""
    a, level = np.asarray(a, dtype=float), _level(level)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"a: need shape (n >= 2, S), got {a.shape}")
    n = a.shape[0]
    return sps.t.ppf(0.5 + level / 2, n - 1) * a.std(axis=0, ddof=1) / math.sqrt(n)


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


# ------------------------------------------------------------------------------------------ tests and power
def paired_t_p(d) -> float:
    """Two-sided p-value of the one-sample t-test of mean(d) = 0 (d: per-seed paired differences, n >= 2).

    t = mean(d) / (s / sqrt(n)) with n - 1 degrees of freedom; p = 2 P(T > |t|). All-equal d gives p = 0 when
    mean(d) != 0 and p = 1 when it is 0 (the limit of the formula).
    """
    a = _values(d, "d")
    s = a.std(ddof=1)
    if s == 0:
        return 0.0 if a.mean() != 0 else 1.0
    t = a.mean() / (s / math.sqrt(a.size))
    return float(2 * sps.t.sf(abs(t), a.size - 1))


def wilcoxon_p(d) -> float:
    """Two-sided exact Wilcoxon signed-rank p-value of the per-seed differences ``d`` (zeros dropped).

    With n nonzero differences the smallest attainable p is 2 / 2^n (0.0625 at n = 5).
    """
    a = _values(d, "d")
    a = a[a != 0]
    if a.size == 0:
        return 1.0
    return float(sps.wilcoxon(a, alternative="two-sided", method="exact").pvalue)


def holm(pvalues) -> list[float]:
    """Holm step-down adjusted p-values, in the input's order.

    Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting every
    hypothesis whose adjusted p is below alpha controls the family-wise error rate at alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError(f"pvalues must be a 1-d list of numbers in [0, 1]; got {pvalues!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.maximum.accumulate(adj)
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def paired_t_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with n pairs, true mean ``effect``, spread ``sd``.

    P(|T'| > t_{1-alpha/2, n-1}) for T' noncentral t with n - 1 degrees of freedom and noncentrality
    effect / sd * sqrt(n).
    """
    if n < 2 or sd <= 0:
        raise ValueError(f"need n >= 2 and sd > 0; got n={n}, sd={sd}")
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    nc = effect / sd * math.sqrt(n)
    return float(sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc))


MAX_POWER_SEEDS = 10_000


def seeds_for_power(d, alpha: float, power: float = 0.8) -> int | None:
    """Fewest seeds n for which a paired t-test at ``alpha`` has ``power``, taking the observed mean and spread of
    the per-seed differences ``d`` as the truth; None when the observed mean is 0 or more than
    :data:`MAX_POWER_SEEDS` would be needed."""
    a = _values(d, "d")
    effect, sd = abs(float(a.mean())), float(a.std(ddof=1))
    if effect == 0:
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while paired_t_power(effect, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_POWER_SEEDS:
            return None
    while lo < hi:  # power grows with n: bisect for the first n that reaches it
        mid = (lo + hi) // 2
        if paired_t_power(effect, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi
