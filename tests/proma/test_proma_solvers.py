"""Solvers on the Gram system against ``reference.removed_component`` and the intra projection."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import reference
from proma import subspace
from proma.intra import gradient_rows, intra_project, row_cutoff
from proma.solvers import eigen_cutoff, solve
from proma.subspace import top_right_singular_vectors
from verification.tolerances import FLOAT32_RTOL, FLOAT64_RTOL

# Residual of the intra subspace search in units of eps_w * lambda_1: the backward error of a dense eigh in the
# work dtype, which the search must reach (the bound the ARPACK route stopped at before).
SEARCH_RESIDUAL_EPS = 4.0
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@st.composite
def gram_problems(draw):
    """Sequence gradients (b, P) with duplicated / zero / scaled rows, a running gradient and weights."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    b = draw(st.integers(1, 6))
    P = draw(st.integers(1, 12))
    g = rng.standard_normal((b, P)) * rng.choice([1e-3, 1.0, 50.0], size=(b, 1))
    kind = draw(st.sampled_from(["generic", "duplicate", "zero_row", "scaled_copy", "low_rank"]))
    if kind == "duplicate" and b > 1:
        g[-1] = g[0]
    elif kind == "zero_row":
        g[draw(st.integers(0, b - 1))] = 0.0
    elif kind == "scaled_copy" and b > 1:
        g[-1] = -3.0 * g[0]
    elif kind == "low_rank" and b > 2:
        g = rng.standard_normal((b, 2)) @ rng.standard_normal((2, P))
    G = rng.standard_normal(P)
    w = rng.standard_normal(b)
    return g, G, w


def _removed(g, G, w, solver, work_dtype=torch.float64, **kw):
    K, h = torch.tensor(g @ g.T), torch.tensor(g @ G)
    sol = solve(K, h, torch.tensor(w), solver=solver, P=g.shape[1], work_dtype=work_dtype, **kw)
    return sol, sol.coef.numpy() @ g


@pytest.mark.parametrize("solver", ["exact", "gram_schmidt", "ridge"])
@given(problem=gram_problems(), passes=st.integers(1, 3))
def test_solvers_match_reference(problem, passes, solver):
    g, G, w = problem
    sol, R = _removed(g, G, w, solver, passes=passes, ridge=0.05)
    expect = reference.removed_component(G, g, solver=solver, passes=passes, ridge=0.05)
    scale = np.linalg.norm(G)
    assert np.linalg.norm(R - expect) <= FLOAT64_RTOL * 1e2 * scale
    assert float(sol.removed_norm) == pytest.approx(np.linalg.norm(expect), rel=1e-7, abs=1e-9 * scale)
    assert float(sol.incoming_norm) == pytest.approx(np.linalg.norm(w @ g), rel=1e-7, abs=1e-9 * scale)


@given(problem=gram_problems(), bound=st.floats(0.0, 2.0))
def test_relative_bound_caps_removed_norm(problem, bound):
    g, G, w = problem
    sol, R = _removed(g, G, w, "exact", relative_bound=bound)
    uncapped = reference.removed_component(G, g, solver="exact")
    cap = bound * np.linalg.norm(w @ g)
    assert np.linalg.norm(R) <= cap * (1 + 1e-9) + 1e-12
    assert np.linalg.norm(R) == pytest.approx(min(cap, np.linalg.norm(uncapped)), rel=1e-7, abs=1e-10)


def test_exact_rank_of_duplicated_rows():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 9))
    g[2] = g[0]
    g[3] = 0.0
    sol, R = _removed(g, rng.standard_normal(9), np.ones(4), "exact")
    assert sol.rank == 2


def test_eigen_cutoff_separates_signal_from_rounding():
    # float32 gradients: a relative singular value of 1e-4 (eigenvalue 1e-8) is a real direction, one
    # of 1e-8 (two float32 copies of a sequence) is rounding; float64 keeps everything above ~1e-7.
    c32, c64 = eigen_cutoff(8, 100, torch.float32), eigen_cutoff(8, 100, torch.float64)
    assert (1e-8) ** 2 < c32 < (1e-4) ** 2
    assert 8 * torch.finfo(torch.float64).eps <= c64 < (1e-7) ** 2 * 10


def test_float32_gradients_keep_a_small_but_real_direction():
    # Real Qwen3 microbatches have sequence gradients with relative singular values ~7e-4 (seen on a
    # q_norm weight); the exact solver must keep such a direction in float32, as the float64 reference does.
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    V, _ = np.linalg.qr(rng.standard_normal((64, 4)))
    g = (U * np.array([1.0, 0.3, 0.05, 7e-4])) @ V.T
    G = rng.standard_normal(64)
    w = rng.standard_normal(4)
    sol, R = _removed(g.astype(np.float32).astype(np.float64), G, w, "exact", work_dtype=torch.float32)
    assert sol.rank == 4
    expect = G - reference.project_out(G, g)
    assert np.linalg.norm(R - expect) <= 1e-3 * np.linalg.norm(expect)


@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 9), d=st.integers(1, 9), rank=st.integers(0, 3),
       form=st.sampled_from(["two_sided", "kron"]))
def test_intra_project_matches_reference(seed, t, d, rank, form):
    rng = np.random.default_rng(seed)
    o = d + 1
    X, D = rng.standard_normal((t, d)), rng.standard_normal((t, o))
    grad = rng.standard_normal((o, d))
    got = intra_project(torch.tensor(grad), torch.tensor(X), torch.tensor(D), rank=rank, form=form).numpy()
    expect = reference.intra_project(grad, X, D, rank=rank, form=form)
    assert np.linalg.norm(got - expect) <= FLOAT64_RTOL * np.linalg.norm(grad) * 10


@pytest.mark.parametrize("dtype, tiny", [(torch.float64, 1e-17), (torch.float32, 1e-9)])
@pytest.mark.parametrize("form", ["two_sided", "kron"])
def test_intra_project_leaves_rounding_zero_rows_out_as_the_reference_does(dtype, tiny, form):
    # a token row whose output gradient is rounding of an exact zero (relative `tiny`, below o * eps of the work
    # dtype) defines no direction; the reference's cutoff at that dtype's eps says the same
    rng = np.random.default_rng(11)
    X, D = rng.standard_normal((7, 5)), rng.standard_normal((7, 4))
    X[0] *= 10.0
    D[0] = tiny * np.abs(D).max()
    grad = rng.standard_normal((4, 5))
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    got = intra_project(t(grad), t(X), t(D), rank=2, form=form).double().numpy()
    row_rcond = row_cutoff(D.shape[1], dtype)
    cast = lambda a: t(a).double().numpy()  # noqa: E731
    expect = reference.intra_project(cast(grad), cast(X), cast(D), rank=2, form=form, row_rcond=row_rcond)
    left_out = reference.intra_project(cast(grad), cast(X[1:]), cast(D[1:]), rank=2, form=form)
    rtol = FLOAT64_RTOL * 10 if dtype == torch.float64 else FLOAT32_RTOL
    assert np.linalg.norm(got - expect) <= rtol * np.linalg.norm(grad)
    assert np.linalg.norm(expect - left_out) <= rtol * np.linalg.norm(grad)
    counted = reference.intra_project(cast(grad), cast(X), cast(D), rank=2, form=form, row_rcond=0.0)
    assert np.linalg.norm(counted - expect) > 1e-2 * np.linalg.norm(grad)


@pytest.mark.parametrize("relative, kept", [(20 * FLOAT32_EPS, True), (1 * FLOAT32_EPS, False)])
@pytest.mark.parametrize("form", ["two_sided", "kron"])
def test_float32_rows_are_classified_as_the_float64_reference_classifies_them(relative, kept, form):
    # float32 output gradients: a row 20 eps32 below the largest entry is data for the float64 reference (its cut
    # is o * eps64) and must stay data (o * eps32 = 7.6e-6 for o = 64 would drop it); a row at 1 eps32 is where a
    # row that is zero in exact arithmetic rounds to, and must be left out
    rng = np.random.default_rng(12)
    X, D = rng.standard_normal((7, 5)), rng.standard_normal((7, 64))
    X[0] *= 10.0   # the row's activation dominates V: keeping it or not changes the projection
    D[0] = 0.0
    D[0, 3] = relative * np.abs(D).max()
    grad = rng.standard_normal((64, 5))
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = intra_project(f32(grad), f32(X), f32(D), rank=2, form=form).double().numpy()
    cast = lambda a: f32(a).double().numpy()  # noqa: E731
    with_row = reference.intra_project(cast(grad), cast(X), cast(D), rank=2, form=form)
    without = reference.intra_project(cast(grad), cast(X[1:]), cast(D[1:]), rank=2, form=form)
    assert np.linalg.norm(with_row - without) > 1e-2 * np.linalg.norm(grad)
    expect = with_row if kept else without
    assert np.linalg.norm(got - expect) <= FLOAT32_RTOL * np.linalg.norm(grad)
    assert bool(gradient_rows(f32(D))[0]) == kept


def test_top_singular_vectors_span_matches_svd():
    rng = np.random.default_rng(1)
    for t, d in [(20, 5), (5, 20)]:
        M = rng.standard_normal((t, d)) * np.array([10.0, 5.0] + [1.0] * (d - 2))[None, :]
        V = top_right_singular_vectors(torch.tensor(M), 2).numpy()
        _, _, vt = np.linalg.svd(M)
        np.testing.assert_allclose(V @ V.T, vt[:2].T @ vt[:2], atol=1e-10)


def test_top_singular_vectors_respect_numerical_rank():
    M = torch.tensor(np.outer(np.arange(1.0, 6.0), np.ones(4)))  # rank 1
    assert top_right_singular_vectors(M, 3).shape == (4, 1)
    assert top_right_singular_vectors(torch.zeros(3, 4, dtype=torch.float64), 2).shape == (4, 0)


def test_unknown_solver():
    with pytest.raises(ValueError, match="solver"):
        solve(torch.eye(2), torch.ones(2), torch.ones(2), solver="qr", P=2)


@pytest.mark.parametrize("t, d", [(400, 200), (200, 400)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_singular_vectors_of_large_factors_match_svd(t, d, dtype):
    # large factors take the Lanczos route; a flat spectrum (sigma_2 / sigma_1 = 0.95, as activations of a
    # freshly initialised model) is the slow case for it. The top vector must match the float64 SVD of the
    # same (rounded) factor to the dtype's eigh accuracy divided by the relative eigen-gap.
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.standard_normal((t, min(t, d))))
    W, _ = np.linalg.qr(rng.standard_normal((d, min(t, d))))
    sv = np.concatenate([[1.0, 0.95, 0.93], np.linspace(0.9, 0.1, min(t, d) - 3)])
    M = torch.tensor((U * sv) @ W.T, dtype=dtype)
    assert min(t, d) > subspace.DENSE_EIGH_MAX  # the Krylov route is the one under test
    sub = subspace.dominant_subspace(M, 1)
    # converged (10x headroom: in float64 the residual's own rounding is of the order of the bound)
    assert float(sub.residual[0]) <= 10 * SEARCH_RESIDUAL_EPS * float(torch.finfo(dtype).eps)
    V = top_right_singular_vectors(M, 1).numpy()
    _, _, vt = np.linalg.svd(M.double().numpy())
    gap = 1.0 - 0.95 ** 2  # relative gap of the top two Gram eigenvalues
    err = np.linalg.norm(V @ V.T - np.outer(vt[0], vt[0]))
    assert V.shape == (d, 1)
    # residual <= SEARCH_RESIDUAL_EPS eps lambda_1 bounds the eigenvector error by SEARCH_RESIDUAL_EPS eps / gap;
    # 10x headroom
    assert err <= 10 * SEARCH_RESIDUAL_EPS * float(torch.finfo(dtype).eps) / gap


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, FLOAT64_RTOL * 10), (torch.float32, FLOAT32_RTOL)])
@pytest.mark.parametrize("form", ["two_sided", "kron"])
def test_intra_project_on_the_krylov_route_matches_reference(dtype, rtol, form):
    # Gaussian factors above the dense size on both sides: the edge of their spectrum is flat (the top
    # eigen-gap of a Wishart matrix is small), the slow case for the search. Compared with the float64
    # reference's SVD of the same rounded factors.
    rng = np.random.default_rng(5)
    t, d, o = 300, subspace.DENSE_EIGH_MAX + 40, subspace.DENSE_EIGH_MAX + 10
    X, D, grad = (torch.tensor(rng.standard_normal(s), dtype=dtype) for s in ((t, d), (t, o), (o, d)))
    got = intra_project(grad, X, D, rank=2, form=form).double().numpy()
    expect = reference.intra_project(grad.double().numpy(), X.double().numpy(), D.double().numpy(), rank=2,
                                     form=form)
    assert np.linalg.norm(got - expect) <= rtol * np.linalg.norm(grad.double().numpy())
