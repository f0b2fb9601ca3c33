"""Properties of reference.project_out: an exact orthogonal projector for any basis, global or per block."""
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from ref_strategies import assume_well_separated, bases, matrices, partitions, vectors

from reference import normalize_blocks, project_out, row_space
from verification.tolerances import FLOAT64_RTOL, REFERENCE_ATOL

N = st.integers(1, 8)


@st.composite
def problems(draw, min_b=0, max_b=6):
    n = draw(N)
    return draw(bases(n, min_b=min_b, max_b=max_b)), draw(vectors(n)), draw(vectors(n))


def close(a, b, scale=1.0):
    np.testing.assert_allclose(a, b, rtol=0, atol=REFERENCE_ATOL * max(scale, 1.0))


def brute_force_projection(v, basis, tol=1e-9):
    """Twice-iterated classical Gram-Schmidt over the rows, written as explicit loops."""
    q = []
    biggest = max([math.hypot(*row) for row in basis] + [0.0])
    for row in basis:
        w = [float(x) for x in row]
        for _ in range(2):
            for e in q:
                c = sum(a * b for a, b in zip(w, e))
                w = [a - c * b for a, b in zip(w, e)]
        norm = math.hypot(*w)
        if norm > tol * biggest:
            q.append([a / norm for a in w])
    out = [float(x) for x in v]
    for e in q:
        c = sum(a * b for a, b in zip(out, e))
        out = [a - c * b for a, b in zip(out, e)]
    return np.array(out)


@given(problems())
def test_idempotent(p):
    basis, v, _ = p
    once = project_out(v, basis)
    close(project_out(once, basis), once, np.linalg.norm(v))


@given(problems())
def test_symmetric(p):
    basis, u, w = p
    lhs = project_out(u, basis) @ w
    rhs = u @ project_out(w, basis)
    close(lhs, rhs, np.linalg.norm(u) * np.linalg.norm(w))


@given(problems())
def test_orthogonal_to_every_basis_row(p):
    basis, v, _ = p
    out = project_out(v, basis)
    for row in basis:
        close(row @ out, 0.0, np.linalg.norm(row) * np.linalg.norm(v))


@given(problems())
def test_pythagoras(p):
    basis, v, _ = p
    out = project_out(v, basis)
    close(out @ out + (v - out) @ (v - out), v @ v, v @ v)
    assert np.linalg.norm(out) <= np.linalg.norm(v) * (1 + FLOAT64_RTOL)


@given(problems(), st.lists(st.sampled_from([-4.0, -1.0, 0.25, 0.5, 2.0, 8.0]), min_size=6, max_size=6))
def test_invariant_to_row_scaling(p, scales):
    basis, v, _ = p
    scaled = basis * np.array(scales[: basis.shape[0]])[:, None]
    close(project_out(v, scaled), project_out(v, basis), np.linalg.norm(v))


@given(problems(min_b=1), st.data())
def test_invariant_to_duplicated_and_zero_rows(p, data):
    basis, v, _ = p
    picks = data.draw(st.lists(st.integers(0, basis.shape[0] - 1), min_size=1, max_size=4))
    extended = np.concatenate([basis, basis[picks], np.zeros((2, basis.shape[1]))])
    extended = extended[data.draw(st.permutations(range(extended.shape[0])))]
    close(project_out(v, extended), project_out(v, basis), np.linalg.norm(v))


@given(problems(min_b=1), st.data())
def test_invariant_to_invertible_mixing(p, data):
    basis, v, _ = p
    b = basis.shape[0]
    mix = data.draw(matrices(b, b))
    # mixing changes the rounding of near-dependent rows; judge only unambiguous ranks, with rcond above noise
    assume(np.linalg.cond(mix) < 1e4)
    assume_well_separated(basis)
    mixed = mix @ basis
    assume_well_separated(mixed)
    close(project_out(v, mixed, rcond=1e-9), project_out(v, basis, rcond=1e-9), np.linalg.norm(v) * 1e2)


@given(problems())
def test_matches_brute_force_gram_schmidt(p):
    basis, v, _ = p
    assume_well_separated(basis)
    close(project_out(v, basis, rcond=1e-9), brute_force_projection(v, basis), np.linalg.norm(v) * 1e2)


@given(N, st.data())
def test_full_rank_basis_gives_zero(n, data):
    basis = data.draw(matrices(n + data.draw(st.integers(0, 2)), n))
    assume(np.linalg.matrix_rank(basis) == n)
    v = data.draw(vectors(n))
    close(project_out(v, basis), np.zeros(n), np.linalg.norm(v))


@given(N, st.data())
def test_empty_and_zero_basis_leave_v_unchanged(n, data):
    v = data.draw(vectors(n))
    assert np.array_equal(project_out(v, np.zeros((0, n))), v)
    assert np.array_equal(project_out(v, np.zeros((3, n))), v)


@given(problems(), st.data())
def test_rows_of_2d_v_projected_independently(p, data):
    basis, v, w = p
    stacked = project_out(np.stack([v, w]), basis)
    close(stacked[0], project_out(v, basis), np.linalg.norm(v))
    close(stacked[1], project_out(w, basis), np.linalg.norm(w))


@given(problems())
def test_row_space_is_orthonormal_and_spans_basis(p):
    basis, _, _ = p
    q = row_space(basis)
    close(q @ q.T, np.eye(q.shape[0]))
    close(basis - (basis @ q.T) @ q, np.zeros_like(basis), np.abs(basis).max(initial=0.0) * basis.shape[1])


def test_rcond_controls_the_rank_decision():
    basis = np.array([[1.0, 0.0], [0.0, 1e-6]])
    v = np.array([1.0, 1.0])
    np.testing.assert_allclose(project_out(v, basis), [0.0, 0.0], atol=REFERENCE_ATOL)
    np.testing.assert_allclose(project_out(v, basis, rcond=1e-3), [0.0, 1.0], atol=REFERENCE_ATOL)


# ---- layer-wise (blocks) -------------------------------------------------------------------------------

@st.composite
def blocked(draw):
    n = draw(N)
    return draw(bases(n, max_b=5)), draw(vectors(n)), draw(partitions(n))


@given(blocked())
def test_layerwise_is_orthogonal_to_every_global_row(p):
    basis, v, sizes = p
    out = project_out(v, basis, blocks=sizes)
    for row in basis:
        close(row @ out, 0.0, np.linalg.norm(row) * np.linalg.norm(v))


@given(blocked())
def test_layerwise_never_longer_than_global(p):
    basis, v, sizes = p
    layer = np.linalg.norm(project_out(v, basis, blocks=sizes))
    whole = np.linalg.norm(project_out(v, basis))
    assert layer <= whole + REFERENCE_ATOL * max(np.linalg.norm(v), 1.0)


@given(blocked())
def test_layerwise_equals_per_block_projection(p):
    basis, v, sizes = p
    out = project_out(v, basis, blocks=sizes)
    for blk in normalize_blocks(sizes, v.shape[0]):
        close(out[blk], project_out(v[blk], basis[:, blk]), np.linalg.norm(v))


@given(problems())
def test_one_block_equals_global(p):
    basis, v, _ = p
    n = v.shape[0]
    expected = project_out(v, basis)
    assert np.array_equal(project_out(v, basis, blocks=[n]), expected)
    assert np.array_equal(project_out(v, basis, blocks=[slice(0, n)]), expected)


@given(blocked(), st.randoms(use_true_random=False))
def test_blocks_as_slices_in_any_order_equal_sizes(p, rnd):
    basis, v, sizes = p
    slices = normalize_blocks(sizes, v.shape[0])
    rnd.shuffle(slices)
    assert np.array_equal(project_out(v, basis, blocks=slices), project_out(v, basis, blocks=sizes))


@pytest.mark.parametrize(
    "blocks, message",
    [([2, 2], "sizes sum to 4"), ([3, 3], "sizes sum to 6"), ([slice(0, 2), slice(3, 5)], "gap"),
     ([slice(0, 3), slice(2, 5)], "overlap"), ([slice(0, 4)], "cover only"), ([2, slice(2, 5)], "mixture"),
     ([slice(0, 5, 2)], "step 1"), ([-1, 6], ">= 0"), ([slice(0, 7)], "not a range"), ("ab", "sequence")],
)
def test_blocks_that_do_not_partition_raise(blocks, message):
    with pytest.raises(ValueError, match="blocks") as info:
        project_out(np.ones(5), np.ones((1, 5)), blocks=blocks)
    assert message in str(info.value)


# ---- the default rank cutoff, pinned against numpy.linalg.matrix_rank ------------------------------------

# Smallest relative singular value the property prescribes: float64 resolves it (its rounding error is ~eps
# of the largest one), and it lies within a few multiples of the default cutoff max(b, n) * eps, so any
# cutoff looser than that by a factor of ~10 or more drops a direction that matrix_rank keeps.
SMALLEST_RESOLVED_SV = 1e-14


@st.composite
def prescribed_spectra(draw):
    """(basis, rank): a (b, n) basis W diag(s) Q with random orthonormal W, Q, s_max scaled by 2^k, the
    other nonzero relative singular values log-uniform in [SMALLEST_RESOLVED_SV, 1] and the rest exactly 0."""
    b, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rank = draw(st.integers(1, min(b, n)))
    exponents = draw(st.lists(st.floats(np.log10(SMALLEST_RESOLVED_SV), 0.0), min_size=rank - 1, max_size=rank - 1))
    s = np.array([1.0, *(10.0 ** e for e in exponents)]) * 2.0 ** draw(st.integers(-30, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = np.linalg.qr(rng.standard_normal((b, rank)))[0]
    q = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    return (w * s) @ q.T, rank


@given(prescribed_spectra())
def test_default_cutoff_matches_matrix_rank_down_to_1e14(p):
    basis, rank = p
    assert np.linalg.matrix_rank(basis) == rank  # the construction itself: every prescribed direction resolves
    assert row_space(basis).shape[0] == rank


def test_default_cutoff_keeps_the_smallest_resolved_direction():
    """The property's edge as one fixed example: relative singular value SMALLEST_RESOLVED_SV in a 12 x 12 basis."""
    s = np.geomspace(1.0, SMALLEST_RESOLVED_SV, 12)
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 12)))[0]
    basis = (q * s) @ q.T
    assert np.linalg.matrix_rank(basis) == row_space(basis).shape[0] == 12
