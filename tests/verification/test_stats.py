"""verification.studies.stats against scipy and brute force."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from verification.studies import stats
from verification.tolerances import FLOAT64_RTOL

# A percentile bootstrap with 10k resamples estimates a quantile of the resampled means to about
# 1/sqrt(10k) of their spread; 3% of the interval's width leaves room for that Monte-Carlo error.
BOOT_WIDTH_RTOL = 0.03

X = np.array([0.71, 0.65, 0.80, 0.58, 0.77])
A = np.array([0.012, 0.010, 0.015, 0.011, 0.013])
B = np.array([0.016, 0.015, 0.018, 0.014, 0.019])


def test_t_interval_matches_scipy():
    iv = stats.t_interval(X, level=0.95)
    lo, hi = sps.t.interval(0.95, X.size - 1, loc=X.mean(), scale=sps.sem(X))
    np.testing.assert_allclose([iv["lo"], iv["hi"]], [lo, hi], rtol=FLOAT64_RTOL)
    assert iv["mean"] == pytest.approx(X.mean(), rel=FLOAT64_RTOL) and iv["n"] == 5 and "t" in iv["method"]


def _exact_bootstrap_quantiles(x, level):
    """All n^n equally likely resamples (brute force), quantiles of their means."""
    means = np.array([x[list(k)].mean() for k in itertools.product(range(x.size), repeat=x.size)])
    return np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])


def test_bootstrap_interval_matches_exhaustive_enumeration():
    iv = stats.bootstrap_interval(X, level=0.9)
    lo, hi = _exact_bootstrap_quantiles(X, 0.9)
    width = hi - lo
    assert abs(iv["lo"] - lo) <= BOOT_WIDTH_RTOL * width and abs(iv["hi"] - hi) <= BOOT_WIDTH_RTOL * width
    assert stats.bootstrap_interval(X, level=0.9) == iv  # seeded: reproducible


def test_paired_difference_is_t_interval_of_differences():
    iv = stats.paired_difference_t(A, B)
    lo, hi = sps.t.interval(0.95, A.size - 1, loc=(A - B).mean(), scale=sps.sem(A - B))
    np.testing.assert_allclose([iv["lo"], iv["hi"]], [lo, hi], rtol=FLOAT64_RTOL)


def test_paired_ratio_t_is_exponentiated_log_ratio_interval():
    r = np.log(A / B)
    lo, hi = sps.t.interval(0.95, r.size - 1, loc=r.mean(), scale=sps.sem(r))
    iv = stats.paired_ratio_t(A, B)
    np.testing.assert_allclose([iv["mean"], iv["lo"], iv["hi"]], np.exp([r.mean(), lo, hi]), rtol=FLOAT64_RTOL)
    assert iv["hi"] < 1  # A is below B at every seed


def test_paired_ratio_bootstrap_keeps_pairs():
    iv = stats.paired_ratio_bootstrap(A, B, level=0.9)
    ratios = np.array([A[list(k)].mean() / B[list(k)].mean() for k in itertools.product(range(5), repeat=5)])
    lo, hi = np.quantile(ratios, [0.05, 0.95])
    width = hi - lo
    assert abs(iv["lo"] - lo) <= BOOT_WIDTH_RTOL * width and abs(iv["hi"] - hi) <= BOOT_WIDTH_RTOL * width
    assert iv["mean"] == pytest.approx(A.mean() / B.mean(), rel=FLOAT64_RTOL)


def test_t_interval_coverage_on_normal_samples():
    """Of 2000 intervals of 5 normal draws, 95% +- 3 binomial standard errors contain the true mean."""
    samples = np.random.default_rng(1).normal(1.0, 2.0, (2000, 5))
    intervals = [stats.t_interval(s) for s in samples]
    hits = sum(iv["lo"] <= 1.0 <= iv["hi"] for iv in intervals)
    se = math.sqrt(0.95 * 0.05 / 2000)
    assert abs(hits / 2000 - 0.95) <= 3 * se


@pytest.mark.parametrize("bad", [[1.0], [1.0, float("nan")]])
def test_bad_values_raise(bad):
    with pytest.raises(ValueError, match="x"):
        stats.t_interval(bad)


def test_misaligned_or_nonpositive_pairs_raise():
    with pytest.raises(ValueError, match="aligned"):
        stats.paired_ratio_t([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        stats.paired_ratio_t([1.0, -2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        stats.t_interval(X, level=1.5)


def test_holm_equals_the_step_down_procedure_and_lies_between_p_and_m_p():
    """Holm's adjusted p against the step-down rule by brute force (reject H_(i) iff p_(j) <= alpha / (m - j + 1)
    for every j <= i), on random families with ties and p = 0 or 1; and the bound p <= adj <= min(1, m p) that
    ``preregistered2.settled`` relies on."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        m = int(rng.integers(1, 16))
        pool = np.concatenate([rng.uniform(0, 0.2, size=4), [0.0, 1.0, 0.01]])  # few values: ties are common
        p = rng.choice(pool, size=m)
        adj = np.array(stats.holm(p))
        assert np.all(p <= adj) and np.all(adj <= np.minimum(1.0, m * p) * (1 + FLOAT64_RTOL))
        alpha = float(rng.uniform(0.001, 0.2))
        order = np.argsort(p, kind="stable")
        passes = np.cumprod([p[order[j]] <= alpha / (m - j) for j in range(m)]).astype(bool)
        rejected = np.empty(m, dtype=bool)
        rejected[order] = passes
        assert np.array_equal(rejected, adj <= alpha), (p, alpha)
