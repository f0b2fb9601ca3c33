"""Properties of reference.intra_project (the intra-microbatch factored projection, our reading)."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from ref_strategies import matrices

import reference
from reference import FORMS, intra_project, intra_subspaces
from verification.tolerances import FLOAT64_RTOL, REFERENCE_ATOL


@st.composite
def layers(draw):
    """(grad (o, i), X (t, i), D (t, o), rank)."""
    t, i, o = draw(st.integers(0, 7)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    X, D = draw(matrices(t, i)), draw(matrices(t, o))
    grad = draw(st.one_of(st.just(D.T @ X), matrices(o, i)))
    return grad, X, D, draw(st.integers(0, 6))


def carrying(D):
    """The rows of D (t, o) above the definition's cutoff o * eps of the largest entry (independent spelling)."""
    row = np.abs(D).max(axis=1, initial=0.0)
    return row > D.shape[1] * np.finfo(np.float64).eps * row.max(initial=0.0)


def close(a, b, scale=1.0):
    np.testing.assert_allclose(a, b, rtol=0, atol=REFERENCE_ATOL * max(scale, 1.0))


def size(a):
    return float(np.abs(a).max(initial=0.0)) * max(a.shape, default=1)


@given(layers())
def test_two_sided_defining_orthogonality(layer):
    grad, X, D, rank = layer
    U, V = intra_subspaces(X, D, rank=rank)
    out = intra_project(grad, X, D, rank=rank, form="two_sided")
    close(U.T @ out, np.zeros((U.shape[1], grad.shape[1])), size(grad))
    close(out @ V, np.zeros((grad.shape[0], V.shape[1])), size(grad))
    close(out, (np.eye(U.shape[0]) - U @ U.T) @ grad @ (np.eye(V.shape[0]) - V @ V.T), size(grad))


@given(layers())
def test_kron_defining_orthogonality(layer):
    grad, X, D, rank = layer
    U, V = intra_subspaces(X, D, rank=rank)
    out = intra_project(grad, X, D, rank=rank, form="kron")
    close(U.T @ out @ V, np.zeros((U.shape[1], V.shape[1])), size(grad))
    close(out + U @ U.T @ grad @ V @ V.T, grad, size(grad))


@given(layers(), st.sampled_from(FORMS))
def test_orthogonal_projection_in_parameter_space(layer, form):
    grad, X, D, rank = layer
    out = intra_project(grad, X, D, rank=rank, form=form)
    close(intra_project(out, X, D, rank=rank, form=form), out, size(grad))
    close(np.sum(out * out) + np.sum((grad - out) ** 2), np.sum(grad * grad), size(grad) ** 2)
    close(np.sum(out * (grad - out)), 0.0, size(grad) ** 2)


@given(layers())
def test_two_sided_removes_at_least_as_much_as_kron(layer):
    grad, X, D, rank = layer
    two = np.linalg.norm(intra_project(grad, X, D, rank=rank, form="two_sided"))
    kron = np.linalg.norm(intra_project(grad, X, D, rank=rank, form="kron"))
    assert two <= kron * (1 + FLOAT64_RTOL) + REFERENCE_ATOL * size(grad)


@given(layers())
def test_subspaces_are_the_dominant_singular_subspaces(layer):
    """Ky Fan: ||D U||_F^2 is the sum of the top r eigenvalues of D^T D (holds under ties too)."""
    _, X, D, rank = layer
    U, V = intra_subspaces(X, D, rank=rank)
    rows = carrying(D)     # the subspaces are those of the token rows that carry gradient
    for A, W in [(D[rows], U), (X[rows], V)]:
        close(W.T @ W, np.eye(W.shape[1]))
        eig = np.sort(np.linalg.eigvalsh(A.T @ A))[::-1] if A.shape[0] else np.zeros(A.shape[1])
        rank_A = np.linalg.matrix_rank(A) if A.shape[0] else 0
        assert W.shape[1] == min(rank, rank_A)
        close(np.sum((A @ W) ** 2), np.sum(eig[: W.shape[1]]), size(A) ** 2)


@given(layers(), st.sampled_from(FORMS))
def test_matches_explicit_kronecker_projector(layer, form):
    """Brute force: U, V from eigenvectors of D^T D and X^T X, projector as an explicit (oi x oi) matrix."""
    grad, X, D, rank = layer
    o, i = grad.shape

    def top(A):
        if A.shape[0] == 0:
            return np.zeros((A.shape[1], 0))
        w, vecs = np.linalg.eigh(A.T @ A)
        order = np.argsort(w)[::-1]
        w, vecs = w[order], vecs[:, order]
        r = min(rank, int(np.sum(w > 1e-18 * max(w[0], 1e-300) + 1e-20)))
        # the top-r subspace must be unique: a clear gap after the r-th eigenvalue
        assume(r == len(w) or w[r] < w[r - 1] * (1 - 1e-3) if r else True)
        assume(r == 0 or w[r - 1] > 1e-8 * w[0])
        return vecs[:, :r]

    X, D = X[carrying(D)], D[carrying(D)]     # the token rows that carry gradient
    U, V = top(D), top(X)
    assume(U.shape[1] == min(rank, np.linalg.matrix_rank(D) if D.shape[0] else 0))
    assume(V.shape[1] == min(rank, np.linalg.matrix_rank(X) if X.shape[0] else 0))
    PU, PV = U @ U.T, V @ V.T
    if form == "two_sided":
        proj = np.kron(np.eye(o) - PU, (np.eye(i) - PV).T)
    else:
        proj = np.eye(o * i) - np.kron(PU, PV.T)
    expected = (proj @ grad.ravel()).reshape(o, i)
    close(intra_project(grad, X, D, rank=rank, form=form), expected, size(grad) * 1e3)


@given(layers(), st.sampled_from(FORMS))
def test_rank_zero_and_zero_factors_change_nothing(layer, form):
    grad, X, D, _ = layer
    assert np.array_equal(intra_project(grad, X, D, rank=0, form=form), grad)
    zero = intra_project(grad, np.zeros_like(X), np.zeros_like(D), rank=3, form=form)
    assert np.array_equal(zero, grad)


@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_full_rank_factors_remove_everything(i, o, data):
    t = max(i, o) + data.draw(st.integers(0, 2))
    X, D = data.draw(matrices(t, i)), data.draw(matrices(t, o))
    assume(np.linalg.matrix_rank(X[carrying(D)]) == i and np.linalg.matrix_rank(D) == o)
    grad = data.draw(matrices(o, i))
    for form in FORMS:
        close(intra_project(grad, X, D, rank=max(i, o), form=form), np.zeros((o, i)), size(grad))


@given(layers(), st.integers(1, 3))
def test_leading_token_dimensions_are_flattened(layer, b):
    grad, X, D, rank = layer
    Xb, Db = np.concatenate([X] * b), np.concatenate([D] * b)
    flat = intra_project(grad, Xb, Db, rank=rank)
    close(intra_project(grad, Xb.reshape(b, -1, X.shape[1]), Db.reshape(b, -1, D.shape[1]), rank=rank), flat,
          size(grad))


def test_gradient_rows_cut_at_o_eps_of_the_largest_entry():
    eps = np.finfo(np.float64).eps
    D = np.array([[0.0, 2.0, 0.0], [1e-17, 0.0, 0.0], [0.0, 0.0, 2.0 * 3 * eps * 1.01], [0.0, 0.0, 0.0],
                  [-1e-3, 0.0, 0.0]])
    np.testing.assert_array_equal(reference.gradient_rows(D), [True, False, True, False, True])
    np.testing.assert_array_equal(reference.gradient_rows(D, row_rcond=1e-2), [True, False, False, False, False])
    assert not reference.gradient_rows(np.zeros((3, 2))).any()
    assert reference.gradient_rows(np.zeros((0, 2))).shape == (0,)
    with pytest.raises(ValueError, match="row_rcond"):
        reference.gradient_rows(D, row_rcond=-1.0)


@pytest.mark.parametrize("form", FORMS)
def test_a_rounding_zero_row_defines_no_direction(form):
    """A token whose output gradient is zero in exact arithmetic but rounds to ~1e-17 (the first token's query in
    a causal model) adds no direction to V: the result is that of the row left out, and far from the row kept."""
    rng = np.random.default_rng(5)
    X, D = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    grad = D.T @ X
    X_extra = np.vstack([X, 10.0 * rng.standard_normal((1, 4))])
    for tiny in (0.0, 1e-17, -3e-16):
        D_extra = np.vstack([D, np.array([[tiny, 0.0, tiny]])])
        got = intra_project(grad, X_extra, D_extra, rank=2, form=form)
        np.testing.assert_allclose(got, intra_project(grad, X, D, rank=2, form=form), rtol=0, atol=1e-12)
    # the cutoff is what decides: with the row counted (row_rcond 0) the result moves by O(1)
    counted = intra_project(grad, X_extra, D_extra, rank=2, form=form, row_rcond=0.0)
    assert np.abs(counted - intra_project(grad, X, D, rank=2, form=form)).max() > 1e-2 * np.abs(grad).max()


def test_hand_computed_rank_one():
    X = np.array([[1.0, 0.0], [1.0, 0.0]])   # V = e1
    D = np.array([[0.0, 2.0], [0.0, 1.0]])   # U = e2
    grad = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(intra_project(grad, X, D, rank=1), [[0.0, 2.0], [0.0, 0.0]], atol=REFERENCE_ATOL)
    np.testing.assert_allclose(intra_project(grad, X, D, rank=1, form="kron"), [[1.0, 2.0], [0.0, 4.0]],
                               atol=REFERENCE_ATOL)


@pytest.mark.parametrize("kwargs, name", [
    ({"rank": -1}, "rank"), ({"rank": 1.5}, "rank"), ({"rank": True}, "rank"),
    ({"rank": 1, "form": "left"}, "form"),
])
def test_bad_rank_or_form_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        intra_project(np.ones((2, 3)), np.ones((4, 3)), np.ones((4, 2)), **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="grad"):
        intra_project(np.ones((3, 2)), np.ones((4, 3)), np.ones((4, 2)), rank=1)
    with pytest.raises(ValueError, match="leading"):
        intra_project(np.ones((2, 3)), np.ones((4, 3)), np.ones((5, 2)), rank=1)
    with pytest.raises(ValueError, match="X"):
        intra_project(np.ones((2, 3)), np.full((4, 3), np.nan), np.ones((4, 2)), rank=1)


def test_intra_apply_with_sliced_subspaces_equals_intra_project():
    # the report finds the largest rank's subspaces once and slices them for smaller ranks
    rng = np.random.default_rng(3)
    X, D = rng.standard_normal((30, 7)), rng.standard_normal((30, 5))
    grad = rng.standard_normal((5, 7))
    U, V = reference.intra_subspaces(X, D, rank=4)
    for rank in (1, 2, 4):
        for form in ("two_sided", "kron"):
            expect = reference.intra_project(grad, X, D, rank=rank, form=form)
            got = reference.intra_apply(grad, U[:, :rank], V[:, :rank], form=form)
            np.testing.assert_allclose(got, expect, rtol=0, atol=1e-12 * np.linalg.norm(grad))
