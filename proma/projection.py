"""Solvers on a Gram system: which combination of the sequence gradients to remove from G.

Index conventions: b sequences of the microbatch, P flattened size of one parameter tensor (a block).

Everything here works on b x b quantities only, in float64, so it is the same for every layer rule and
strategy (and for a distributed caller that all-reduced them first):

- ``K`` (b, b): the Gram ``K_ij = <g_i, g_j>`` of the per-sequence gradients restricted to the block;
- ``h`` (b,):   inner products ``h_i = <g_i, G>`` with the running gradient G of the block;
- ``w`` (b,):   the per-sequence loss weights, so ``pg = sum_i w_i g_i``.

A solver returns coefficients ``c`` with ``R = sum_i c_i g_i`` (the removed component, before the cap
and the shrinkage), which the layer rule turns into a tensor with a single weighted sum
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

import numpy as np
import torch

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
    rank : int, numerical rank of the Gram (number of directions the exact solver used; for the
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


def _norms_and_keep(K: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
    """Row norms ||g_i|| = sqrt(K_ii) and the rows that count as non-zero.

    A row is dropped when its norm is at most ``max(b, P) * eps64`` times the largest row norm, the
    reference's singular-value cutoff (a lone row's singular value is its norm).
    """
    norms = np.sqrt(np.clip(np.diag(K), 0.0, None))
    top = norms.max() if norms.size else 0.0
    keep = norms > max(K.shape[0], P, 1) * EPS64 * top
    return norms, keep & (norms > 0)


def _normalised_gram(K: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept rows ``idx``, their norms ``s`` and the Jacobi-normalised Gram ``N_ij = K_ij / (s_i s_j)``.

    Every solver works on unit-normalised g_i (the published modes by definition, the exact one so that its
    rank decision does not depend on how long each g_i is); rows dropped by :func:`_norms_and_keep` get c_i = 0.
    """
    norms, keep = _norms_and_keep(K, P)
    idx = np.flatnonzero(keep)
    s = norms[idx]
    return idx, s, K[np.ix_(idx, idx)] / np.outer(s, s)


# The b x b algebra runs in NumPy float64 on the host: a solve is a few dozen operations on matrices of a
# few dozen entries, where NumPy's per-call cost is several times below torch's dispatch.
def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def exact_coefficients(K: np.ndarray, h: np.ndarray, settings: SolverSettings) -> tuple[np.ndarray, int]:
    """Coefficients c of the orthogonal projection of G onto span{g_i}: R = sum_i c_i g_i.

    Parameters
    ----------
    K : (b, b) float64 Gram of the g_i.
    h : (b,) float64, h_i = <g_i, G>.
    settings : block size ``P`` (for the reference's cutoff) and ``work_dtype``, the dtype the Gram was
        formed in (for the rounding cutoff).

    Returns
    -------
    c : (b,) float64, rank : int

    Notes
    -----
    With n_i = g_i / ||g_i||, N = diag(1/||g||) K diag(1/||g||) = Q diag(lam) Q^T and lam > cutoff,
    the projection is ``sum_ij n_i (N^+)_ij <n_j, G>``; c_i = (N^+ h')_i / ||g_i||. The Jacobi scaling makes
    the rank decision independent of how long each g_i is, as the SVD of the basis is.
    """
    b = K.shape[0]
    c = np.zeros(b)
    idx, s, N = _normalised_gram(K, settings.P)
    if idx.size == 0:
        return c, 0
    lam, Q = np.linalg.eigh(N)
    use = lam > eigen_cutoff(b, settings.P, settings.work_dtype) * lam[-1]
    Q, lam = Q[:, use], lam[use]
    a = Q @ ((Q.T @ (h[idx] / s)) / lam)
    c[idx] = a / s
    return c, int(use.sum())


def gram_schmidt_coefficients(K: np.ndarray, h: np.ndarray, settings: SolverSettings) -> tuple[np.ndarray, int]:
    """Coefficients of the published Gram-Schmidt mode: ``settings.passes`` sweeps over the unit-normalised g_i
    in order.

    Parameters and returns as :func:`exact_coefficients` (``rank`` = number of non-zero g_i).
    """
    b = K.shape[0]
    c = np.zeros(b)
    idx, s, N = _normalised_gram(K, settings.P)
    if idx.size == 0:
        return c, 0
    # sequential by definition: sweep i uses the G already reduced by sweeps 1..i-1
    Nl, hl = N.tolist(), (h[idx] / s).tolist()
    k = len(hl)
    al = [0.0] * k
    for _ in range(settings.passes):
        for i in range(k):
            row = Nl[i]
            r = hl[i] - sum(row[j] * al[j] for j in range(k))
            al[i] += r
    c[idx] = np.asarray(al) / s
    return c, int(idx.size)


def ridge_coefficients(K: np.ndarray, h: np.ndarray, settings: SolverSettings) -> tuple[np.ndarray, int]:
    """Coefficients of the published ridge mode: a = (N + ridge I)^{-1} h' on unit-normalised g_i."""
    b = K.shape[0]
    c = np.zeros(b)
    idx, s, N = _normalised_gram(K, settings.P)
    if idx.size == 0:
        return c, 0
    a = np.linalg.solve(N + settings.ridge * np.eye(idx.size), h[idx] / s)
    c[idx] = a / s
    return c, int(idx.size)


# name -> solver(K, h, settings) -> (c, rank), NumPy float64 in and out. A new solver is one function and one
# entry here (and the same name in reference.accumulation.SOLVER_REGISTRY, which the tests compare against).
SOLVER_REGISTRY: dict[str, Callable[[np.ndarray, np.ndarray, SolverSettings], tuple[np.ndarray, int]]] = {
    "exact": exact_coefficients,
    "gram_schmidt": gram_schmidt_coefficients,
    "ridge": ridge_coefficients,
}
SOLVERS = tuple(SOLVER_REGISTRY)


def _quad_norm(K: np.ndarray, v: np.ndarray) -> float:
    """``||sum_i v_i g_i|| = sqrt(v^T K v)`` (clamped at 0 against rounding)."""
    return float(np.sqrt(max(float(v @ (K @ v)), 0.0)))


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
    """Removed-component coefficients for one block, with the relative-bound cap.

    Parameters
    ----------
    K : (b, b) Gram, h : (b,) inner products with G, w : (b,) weights; any float dtype (promoted to float64).
    solver : a key of :data:`SOLVER_REGISTRY` ("exact", "gram_schmidt", "ridge")
    passes, ridge : solver options (see module docstring).
    relative_bound : cap ``||R|| <= relative_bound * ||pg||`` (None: no cap).
    P : block size.  work_dtype : dtype the Gram was formed in.

    Returns
    -------
    Solution (tensors on K's device)
    """
    if solver not in SOLVER_REGISTRY:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    Kn, hn, wn = _as_numpy(K), _as_numpy(h), _as_numpy(w)
    Kn = 0.5 * (Kn + Kn.T)
    c, rank = SOLVER_REGISTRY[solver](Kn, hn, SolverSettings(P=P, work_dtype=work_dtype, passes=passes, ridge=ridge))
    removed = _quad_norm(Kn, c)
    incoming = _quad_norm(Kn, wn)
    if relative_bound is not None:
        cap = relative_bound * incoming
        if removed > cap:
            scale = cap / removed
            c = c * scale
            removed = removed * scale

    def out(x):
        return torch.as_tensor(x, dtype=torch.float64).to(K.device)
    return Solution(coef=out(c), removed_norm=out(removed), incoming_norm=out(incoming), rank=rank)


# ---------------------------------------------------------------------------------------------------
# Intra-microbatch variant: dominant subspaces of the factors.
# ---------------------------------------------------------------------------------------------------

# Gram side length above which the dominant eigenpairs come from ARPACK's Lanczos iteration on the factored
# operator (a few dozen products with M) instead of a dense eigendecomposition of the formed Gram, and the
# residual at which ARPACK stops, in units of eps_w * lambda_1 (the backward error of a dense eigh in M's
# dtype).
LANCZOS_MIN_SIZE = 160
LANCZOS_TOL = 4.0


def _lanczos_pairs(M: torch.Tensor, rank: int, right: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-``rank`` eigenpairs of ``M^T M`` (``right``) or ``M M^T`` by ARPACK, without forming the Gram.

    Implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``) in float64 on ``v -> M^T (M v)``; it stops
    when every wanted Ritz pair has ``||C x - theta x|| <= LANCZOS_TOL * eps_w * theta``, so the vectors are
    at least as accurate as a dense ``eigh`` of the Gram formed in M's dtype. The start vector is M's
    longest row (``right``) or column, which lies in the Gram's range (deterministic on every rank).

    Returns (theta (rank,) descending, X (n, rank)) as float64 tensors; None when ARPACK does not converge
    or M is zero (the caller then decomposes the formed Gram).
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    A = M.detach().double().numpy()
    if right:
        n, start = A.shape[1], A[int(np.argmax((A * A).sum(axis=1)))]
        op = LinearOperator((n, n), matvec=lambda v: A.T @ (A @ v), dtype=np.float64)
    else:
        n, start = A.shape[0], A[:, int(np.argmax((A * A).sum(axis=0)))]
        op = LinearOperator((n, n), matvec=lambda v: A @ (A.T @ v), dtype=np.float64)
    if not start.any():
        return None
    tol = LANCZOS_TOL * float(torch.finfo(M.dtype).eps)
    try:
        theta, X = eigsh(op, k=rank, which="LA", v0=np.ascontiguousarray(start), tol=tol)
    except ArpackNoConvergence:
        return None
    order = np.argsort(theta)[::-1]
    return torch.from_numpy(theta[order].copy()), torch.from_numpy(X[:, order].copy())


def _top_eigenpairs(M: torch.Tensor, rank: int, right: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, float64) and eigenvectors (float64 columns) of ``M^T M`` or ``M M^T``.

    Large Grams on the CPU get their top ``rank`` pairs from :func:`_lanczos_pairs`; otherwise (and when it
    does not converge) every pair comes from a dense ``eigh`` of the Gram formed and decomposed in M's dtype
    (on the CPU: dense eigh of a few hundred rows is faster there).
    """
    n = M.shape[1] if right else M.shape[0]
    if M.device.type == "cpu" and n >= LANCZOS_MIN_SIZE and rank < n // 2:
        found = _lanczos_pairs(M, rank, right)
        if found is not None:
            return found
    lam, Q = torch.linalg.eigh((M.T @ M if right else M @ M.T).cpu())
    return lam.double().flip(0), Q.double().flip(1).to(M.device)


def top_right_singular_vectors(M: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of M (t, d) as float64 columns (d, r), r <= rank.

    From the smaller of the two Grams ``M^T M`` (d x d) and ``M M^T`` (t x t) by :func:`_top_eigenpairs`
    (cheaper than an SVD of M; exact to M's precision). A singular
    value counts as zero when ``s <= cut * s_max`` with ``cut = max(max(t, d) eps64, sqrt(GRAM_NOISE *
    min(t, d) * eps_M))``: the reference's cutoff, raised to the rounding level of a Gram in M's dtype.
    Only the top ``rank`` singular values are compared with the cutoff.
    """
    t, d = M.shape
    if rank == 0 or t == 0 or d == 0:
        return torch.zeros(d, 0, dtype=torch.float64, device=M.device)
    cut = max(max(t, d) * EPS64, (GRAM_NOISE * min(t, d) * float(torch.finfo(M.dtype).eps)) ** 0.5)
    lam, Q = _top_eigenpairs(M, rank, right=d <= t)
    if lam[0] <= 0:
        return Q.new_zeros(d, 0)
    s = lam[:rank].clamp_min(0).sqrt()
    r = int((s > cut * s[0]).sum())
    if d <= t:
        return Q[:, :r]
    V = M.double().T @ (Q[:, :r] / s[:r])
    # one re-orthonormalisation: V from M^T W / s is orthonormal up to rounding of order eps/s_r^2
    V, _ = torch.linalg.qr(V)
    return V


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
    U = top_right_singular_vectors(D, rank).to(grad.dtype)
    V = top_right_singular_vectors(X, rank).to(grad.dtype)
    if form == "kron":
        return grad - U @ ((U.T @ grad) @ V) @ V.T
    if form != "two_sided":
        raise ValueError(f"intra_form must be 'two_sided' or 'kron'; got {form!r}")
    left = grad - U @ (U.T @ grad)
    return left - (left @ V) @ V.T
