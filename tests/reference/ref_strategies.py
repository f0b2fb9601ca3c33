"""Hypothesis strategies for the reference tests: shapes, values, bases, partitions (all float64)."""
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Small integers make exact rank deficiency (duplicates, low-rank products) exact in float64; the float
# branch adds arbitrary values, including tiny ones.
ELEMENTS = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-3, 3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64),
)


def matrices(rows, cols):
    return hnp.arrays(np.float64, (rows, cols), elements=ELEMENTS)


def vectors(n):
    return hnp.arrays(np.float64, (n,), elements=ELEMENTS)


@st.composite
def bases(draw, n, min_b=0, max_b=6):
    """A (b, n) basis: dense, exactly low-rank, or with duplicated / scaled / zero rows."""
    b = draw(st.integers(min_b, max_b))
    kind = draw(st.sampled_from(["dense", "low_rank", "copies"]))
    if b == 0 or kind == "dense":
        return draw(matrices(b, n))
    if kind == "low_rank":
        r = draw(st.integers(1, max(1, min(b, n) - 1)))
        left = draw(hnp.arrays(np.float64, (b, r), elements=st.integers(-2, 2).map(float)))
        right = draw(hnp.arrays(np.float64, (r, n), elements=st.integers(-3, 3).map(float)))
        return left @ right
    base = draw(matrices(max(1, b // 2), n))
    picks = draw(st.lists(st.integers(0, base.shape[0] - 1), min_size=b, max_size=b))
    scales = draw(st.lists(st.sampled_from([0.0, 1.0, -2.0, 0.5]), min_size=b, max_size=b))
    return base[picks] * np.array(scales)[:, None]


@st.composite
def partitions(draw, n):
    """Block sizes (possibly with empty blocks) summing to n."""
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def well_separated(A, *, low=1e-12, high=1e-6):
    """Numerical rank is unambiguous: every singular value is < low * s_max or > high * s_max."""
    if A.size == 0:
        return True
    s = np.linalg.svd(A, compute_uv=False)
    if s[0] == 0:
        return True
    rel = s / s[0]
    return bool(np.all((rel < low) | (rel > high)))


def assume_well_separated(A, **kw):
    assume(well_separated(A, **kw))


def condition(A):
    s = np.linalg.svd(A, compute_uv=False)
    return np.inf if s[-1] == 0 else s[0] / s[-1]
