"""Solvers on a Gram system: which combination of the sequence gradients to remove from G.

Index conventions: b sequences of the microbatch, P flattened size of one parameter tensor (a block).

Everything here works on b x b quantities only, in float64, so it is the same for every layer rule and
strategy (and for a distributed caller that all-reduced them first):

- ``K`` (b, b): the Gram ``K_ij = <g_i, g_j>`` of the per-sequence gradients restricted to the block;
- ``h`` (b,):   inner products ``h_i = <g_i, G>`` with the running gradient G of the block;
- ``w`` (b,):   the per-sequence loss weights, so ``pg = sum_i w_i g_i``.

A solver returns coefficients ``c`` with ``R = sum_i c_i g_i`` (the removed component, before the cap
and the shrinkage), which :class:`proma.updates.ProjectUpdate` turns into a tensor through the block's single
weighted sum (:meth:`proma.layers.Block.add_weighted_`)
``G <- G + sum_i (w_i - shrinkage * scale * c_i) g_i``. The solvers match :mod:`reference.accumulate`:

``"exact"``         R = orthogonal projection of G onto span{g_i}.
``"gram_schmidt"``  n_i = g_i / ||g_i|| (zero rows skipped), ``passes`` sweeps of G <- G - <G, n_i> n_i;
                    the sweeps run on coefficients: with R = sum_j a_j n_j, <G - R, n_i> = h'_i - (N a)_i,
                    N the normalised Gram, h'_i = h_i / ||g_i||.
``"ridge"``         normalised rows, a = (N + ridge I)^{-1} h', R = sum_i a_i n_i.

Rank decisions (exact solver and the intra subspaces). The reference takes the SVD of the basis and
keeps singular values above ``max(b, P) * eps64 * s_max``. Here only the Gram is known. The per-sequence
gradients are computed in a working dtype with machine epsilon ``eps_w`` (float32 for a float32 or 16-bit
model), so their singular values are uncertain by about ``b * eps_w * s_max``; the Gram itself is formed
in float64 (:data:`proma.layers.block.GRAM_DTYPE`), which adds nothing comparable. An eigenvalue of the
(Jacobi-normalised) Gram therefore counts as zero when it is at most
``max((max(b, P) eps64)^2, (GRAM_NOISE * b * eps_w)^2, GRAM_NOISE * b * eps64) * lambda_max``: a
float64 ``eigh`` resolves eigenvalues only to ~b eps64 lambda_max, so in float64 a direction whose
relative singular value lies between ~1e-13 and ~1e-7 is resolved by the reference (SVD of the basis) and
dropped here; in float32 the bound is a relative singular value of ``GRAM_NOISE * b * eps32`` (about 1e-5
for b = 8), below which a direction is indistinguishable from the gradients' own rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .subspace import top_eigenpairs

EPS64 = float(torch.finfo(torch.float64).eps)
# Multiplier of b * eps_w in the singular-value cutoff: rounding of b per-sequence gradients computed in the
# working dtype stays below ~b * eps_w * s_max for the sizes we meet; 10x headroom.
GRAM_NOISE = 10.0
DEFAULT_PASSES = 2     # Gram-Schmidt sweeps (the published setting)
DEFAULT_RIDGE = 1e-2   # ridge regulariser


@dataclass
class Solution:
    """Coefficients of the removed component and diagnostics, all float64 tensors.

    Attributes
    ----------
    coef : (b,) ``R = sum_i coef_i g_i`` after the relative-bound cap (before shrinkage).
    removed_norm : () ``||R||`` after the cap.
    incoming_norm : () ``||pg||``.
    rank : () int64 tensor, numerical rank of the Gram (number of directions the exact solver used; for the
        normalised solvers the number of non-zero sequence gradients).
    """

    coef: torch.Tensor
    removed_norm: torch.Tensor
    incoming_norm: torch.Tensor
    rank: int


@dataclass(frozen=True)
class SolverSettings:
    """What a solver may use besides K and h: the block size ``P``, the dtype the Gram was formed in, and the
    options of the Gram-Schmidt (``passes``) and ridge (``ridge``) solvers."""

    P: int
    work_dtype: torch.dtype = torch.float64
    passes: int = DEFAULT_PASSES
    ridge: float = DEFAULT_RIDGE


def eigen_cutoff(b: int, P: int, work_dtype: torch.dtype) -> float:
    """Relative eigenvalue cutoff of a float64 Gram of ``b`` gradients of size ``P`` computed in ``work_dtype``.

    ``max((max(b, P) eps64)^2, (GRAM_NOISE * b * eps_w)^2, GRAM_NOISE * b * eps64)``: the square of the
    relative singular-value resolution of the gradients, floored by the rounding of a float64 ``eigh``
    (see the module docstring).
    """
    ref = (max(b, P, 1) * EPS64) ** 2
    gradients = (GRAM_NOISE * max(b, 1) * float(torch.finfo(work_dtype).eps)) ** 2
    gram = GRAM_NOISE * max(b, 1) * EPS64  # the float64 eigendecomposition's own rounding
    return max(ref, gradients, gram)


def _normalised_gram(K: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row norms, the rows that count as non-zero, and the Jacobi-normalised Gram, all on K's device.

    A row is dropped when its norm ``||g_i|| = sqrt(K_ii)`` is at most ``max(b, P) * eps64`` times the largest
    row norm (the reference's singular-value cutoff: a lone row's singular value is its norm). Every solver
    works on unit-normalised g_i (the published modes by definition, the exact one so that its rank decision
    does not depend on how long each g_i is). Dropped rows are masked, not removed (no data-dependent
    shapes, so no host read): they get a zero row and column in ``N``, a zero ``h'`` and so ``c_i = 0``.

    Returns
    -------
    s : (b,) row norms, 1 where dropped (safe divisor).  keep : (b,) float64 mask, 1 for kept rows.
    N : (b, b) ``N_ij = K_ij / (s_i s_j)`` on kept rows and columns, 0 elsewhere.
    """
    b = K.shape[0]
    norms = K.diagonal().clamp_min(0.0).sqrt()
    keep = (norms > max(b, P, 1) * EPS64 * norms.max()) & (norms > 0)
    s = torch.where(keep, norms, torch.ones_like(norms))
    mask = keep.to(K.dtype)
    N = K / torch.outer(s, s) * torch.outer(mask, mask)
    return s, mask, N


def exact_coefficients(K: torch.Tensor, h: torch.Tensor,
                       settings: SolverSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients c of the orthogonal projection of G onto span{g_i}: R = sum_i c_i g_i.

    Parameters
    ----------
    K : (b, b) float64 Gram of the g_i (symmetric).
    h : (b,) float64, h_i = <g_i, G>.
    settings : block size ``P`` (for the reference's cutoff) and ``work_dtype``, the dtype the Gram's
        gradients were computed in (for the rounding cutoff).

    Returns
    -------
    c : (b,) float64, rank : () int64 tensor (both on K's device)

    Notes
    -----
    With n_i = g_i / ||g_i||, N = diag(1/||g||) K diag(1/||g||) = Q diag(lam) Q^T and lam > cutoff,
    the projection is ``sum_ij n_i (N^+)_ij <n_j, G>``; c_i = (N^+ h')_i / ||g_i||. The Jacobi scaling makes
    the rank decision independent of how long each g_i is, as the SVD of the basis is. Dropped eigenpairs
    are masked (their 1/lam set to 0), not sliced off.
    """
    s, mask, N = _normalised_gram(K, settings.P)
    lam, Q = torch.linalg.eigh(N)
    use = lam > eigen_cutoff(K.shape[0], settings.P, settings.work_dtype) * lam[-1]
    inv = torch.where(use, 1.0 / torch.where(use, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    a = Q @ (inv * (Q.T @ (h * mask / s)))
    return a * mask / s, use.sum()


def gram_schmidt_coefficients(K: torch.Tensor, h: torch.Tensor,
                              settings: SolverSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the published Gram-Schmidt mode: ``settings.passes`` sweeps over the unit-normalised g_i
    in order.

    Parameters and returns as :func:`exact_coefficients` (``rank`` = number of non-zero g_i).

    Notes
    -----
    One sweep is sequential by definition (sweep i uses the G already reduced by sweeps 1..i-1): with
    ``R = sum_j a_j n_j`` it sets ``a_i += h'_i - sum_j N_ij a_j`` for i = 1..b, a_j already updated for
    j < i. That is one Gauss-Seidel step with unit diagonal, ``a <- a + (I + L)^{-1} (h' - N a)`` with L the
    strictly lower triangle of N: one triangular solve per pass instead of b^2 scalar steps.
    """
    s, mask, N = _normalised_gram(K, settings.P)
    eye = torch.eye(N.shape[0], dtype=N.dtype, device=N.device)
    lower = torch.tril(N, diagonal=-1) + eye
    hp = h * mask / s
    a = torch.zeros_like(hp)
    for _ in range(settings.passes):
        a = a + torch.linalg.solve_triangular(lower, (hp - N @ a)[:, None], upper=False)[:, 0]
    return a * mask / s, mask.sum().to(torch.int64)


def ridge_coefficients(K: torch.Tensor, h: torch.Tensor,
                       settings: SolverSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the published ridge mode: a = (N + ridge I)^{-1} h' on unit-normalised g_i.

    ``N + ridge I`` is symmetric positive definite (ridge > 0), so a Cholesky solve, which needs no check on
    the host (``cholesky_ex``), suffices. Dropped rows have a zero row in N and h' = 0, hence a_i = 0.
    """
    s, mask, N = _normalised_gram(K, settings.P)
    L, _ = torch.linalg.cholesky_ex(N + settings.ridge * torch.eye(N.shape[0], dtype=N.dtype, device=N.device))
    a = torch.cholesky_solve((h * mask / s)[:, None], L)[:, 0]
    return a * mask / s, mask.sum().to(torch.int64)


# name -> solver(K, h, settings) -> (c, rank), float64 tensors in and out on K's device, no host reads. A new
# solver is one function and one entry here (and the same name in reference.accumulation.SOLVER_REGISTRY,
# which the tests compare against).
Solver = Callable[[torch.Tensor, torch.Tensor, SolverSettings], tuple[torch.Tensor, torch.Tensor]]
SOLVER_REGISTRY: dict[str, Solver] = {
    "exact": exact_coefficients,
    "gram_schmidt": gram_schmidt_coefficients,
    "ridge": ridge_coefficients,
}
SOLVERS = tuple(SOLVER_REGISTRY)


def _quad_norm(K: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``||sum_i v_i g_i|| = sqrt(v^T K v)`` (clamped at 0 against rounding), a () tensor."""
    return (v @ (K @ v)).clamp_min(0.0).sqrt()


def solve(
    K: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    *,
    solver: str,
    passes: int = DEFAULT_PASSES,
    ridge: float = DEFAULT_RIDGE,
    relative_bound: float | None = None,
    P: int,
    work_dtype: torch.dtype = torch.float64,
) -> Solution:
    """Removed-component coefficients for one block, with the relative-bound cap, in torch on K's device.

    Parameters
    ----------
    K : (b, b) Gram, h : (b,) inner products with G, w : (b,) weights; any float dtype (promoted to float64).
    solver : a key of :data:`SOLVER_REGISTRY` ("exact", "gram_schmidt", "ridge")
    passes, ridge : solver options (see module docstring).
    relative_bound : cap ``||R|| <= relative_bound * ||pg||`` (None: no cap).
    P : block size.  work_dtype : dtype the Gram's gradients were computed in.

    Returns
    -------
    Solution (float64 tensors on K's device). Nothing is read back to the host: the cap is a
    ``torch.where``, the rank a tensor.
    """
    if solver not in SOLVER_REGISTRY:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    K = K.to(torch.float64)
    K = 0.5 * (K + K.T)
    h, w = h.to(K.device, torch.float64), w.to(K.device, torch.float64)
    settings = SolverSettings(P=P, work_dtype=work_dtype, passes=passes, ridge=ridge)
    c, rank = SOLVER_REGISTRY[solver](K, h, settings)
    removed = _quad_norm(K, c)
    incoming = _quad_norm(K, w)
    if relative_bound is not None:
        cap = relative_bound * incoming
        scale = torch.where(removed > cap, cap / torch.where(removed > 0, removed, torch.ones_like(removed)),
                            torch.ones_like(removed))
        c, removed = c * scale, removed * scale
    return Solution(coef=c, removed_norm=removed, incoming_norm=incoming, rank=rank)


# ---------------------------------------------------------------------------------------------------
# Intra-microbatch variant: dominant subspaces of the factors (the search itself: :mod:`proma.subspace`).
# ---------------------------------------------------------------------------------------------------


@dataclass
class Subspace:
    """Dominant right singular directions of a factor M (t, d), masked instead of sliced.

    Attributes
    ----------
    V : (d, k) float64, orthonormal columns for the directions above the cutoff, zero columns for the others
        (a zero column removes nothing, so no count is read back to the host).
    used : (k,) bool, which columns are directions.
    residual : (k,) float64 relative Ritz residual of the search (0 from a dense eigh).
    """

    V: torch.Tensor
    used: torch.Tensor
    residual: torch.Tensor


def dominant_subspace(M: torch.Tensor, rank: int, *, row_mask: torch.Tensor | None = None) -> Subspace:
    """Top-``rank`` right singular vectors of M (t, d), rows outside ``row_mask`` (t,) counting as zero.

    From the smaller of the two Grams ``M^T M`` (d x d) and ``M M^T`` (t x t) by
    :func:`proma.subspace.top_eigenpairs` (cheaper than an SVD of M; exact to M's precision). A singular
    value counts as zero when ``s <= cut * s_max`` with ``cut = max(max(t, d) eps64, sqrt(GRAM_NOISE *
    min(t, d) * eps_M))``, t the rows that carry data: the reference's cutoff, raised to the rounding level
    of a Gram in M's dtype. Only the top ``rank`` singular values are compared with the cutoff.
    """
    t, d = M.shape
    right = d <= t
    theta, Q, residual = top_eigenpairs(M, rank, right, row_mask=row_mask)
    tokens = torch.tensor(float(t), dtype=torch.float64) if row_mask is None else row_mask.double().sum()
    tokens = tokens.to(theta.device)
    eps = float(torch.finfo(M.dtype).eps)
    cut = torch.maximum(tokens.clamp_min(d) * EPS64, (GRAM_NOISE * tokens.clamp_max(d) * eps).sqrt())
    s = theta.clamp_min(0).sqrt()
    used = (s > cut * s[0]) & (s[0] > 0)
    if right:
        V = Q
    else:
        Mm = M if row_mask is None else M * row_mask[:, None].to(M.dtype)
        V = Mm.double().T @ (Q / torch.where(used, s, torch.ones_like(s)))
        # one re-orthonormalisation: V from M^T W / s is orthonormal up to rounding of order eps/s_r^2; the
        # used columns are a prefix (s descending), which QR's first columns depend on alone
        V = torch.linalg.qr(V)[0]
    return Subspace(V=V * used.to(V.dtype), used=used, residual=residual)


def top_right_singular_vectors(M: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of M (t, d) as float64 columns (d, r), r <= rank the number above
    the cutoff of :func:`dominant_subspace` (read back to the host: for callers outside the backward pass)."""
    t, d = M.shape
    if rank == 0 or t == 0 or d == 0:
        return torch.zeros(d, 0, dtype=torch.float64, device=M.device)
    sub = dominant_subspace(M, rank)
    return sub.V[:, :int(sub.used.sum())]


def project_factored_(grad: torch.Tensor, U: torch.Tensor, V: torch.Tensor, form: str) -> torch.Tensor:
    """In place: grad <- ``(I - UU^T) grad (I - VV^T)`` (``"two_sided"``) or ``grad - UU^T grad VV^T``
    (``"kron"``); returns the norm of what was removed, a () float64 tensor.

    grad (o, i), U (o, r), V (i, r) in grad's dtype, orthonormal columns or zero columns. The removed part
    is never formed: for two-sided it is ``U (U^T grad) + (I - UU^T) grad V V^T``, two mutually orthogonal
    terms, so ``||removed||^2 = ||U^T grad||^2 + ||left V||^2`` with ``left = (I - UU^T) grad``; for kron it
    is ``U (U^T grad V) V^T`` with norm ``||U^T grad V||``.
    """
    if form == "kron":
        core = (U.T @ grad) @ V
        grad.sub_(U @ core @ V.T)
        return core.norm().double()
    if form != "two_sided":
        raise ValueError(f"intra_form must be 'two_sided' or 'kron'; got {form!r}")
    UtG = U.T @ grad
    grad.addmm_(U, UtG, alpha=-1.0)
    leftV = grad @ V
    grad.addmm_(leftV, V.T, alpha=-1.0)
    return (UtG.double().square().sum() + leftV.double().square().sum()).sqrt()


def intra_project(grad: torch.Tensor, X: torch.Tensor, D: torch.Tensor, *, rank: int, form: str) -> torch.Tensor:
    """Factored projection of one linear layer's microbatch gradient (as :func:`reference.intra_project`).

    Parameters
    ----------
    grad : (o, i) microbatch weight gradient.
    X : (t, i) activations, D : (t, o) output gradients of the tokens that carry gradient.
    rank : number of dominant directions on each side; form : "two_sided" or "kron".

    Returns
    -------
    (o, i) tensor in grad's dtype: ``(I - UU^T) grad (I - VV^T)`` or ``grad - UU^T grad VV^T``.
    """
    if form not in ("two_sided", "kron"):
        raise ValueError(f"intra_form must be 'two_sided' or 'kron'; got {form!r}")
    if rank == 0 or X.shape[0] == 0:
        return grad.clone()
    U = dominant_subspace(D, rank).V.to(grad.dtype)
    V = dominant_subspace(X, rank).V.to(grad.dtype)
    out = grad.clone()
    project_factored_(out, U, V, form)
    return out
