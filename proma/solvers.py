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
``G <- G + sum_i (w_i - shrinkage * scale * c_i) g_i``. Each solver is declared once, with its NumPy
definition, in :mod:`reference.solvers`; this module holds the torch implementation of each declared name
(:func:`register`, :func:`add_solver`; docs/extending.md):

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
from types import MappingProxyType
from typing import Callable

import torch

from reference import solvers as reference_solvers

EPS64 = float(torch.finfo(torch.float64).eps)
# Multiplier of b * eps_w in the singular-value cutoff: rounding of b per-sequence gradients computed in the
# working dtype stays below ~b * eps_w * s_max for the sizes we meet; 10x headroom.
GRAM_NOISE = 10.0
# the defaults are the reference's (one definition: reference.solvers)
DEFAULT_PASSES = reference_solvers.DEFAULT_PASSES   # Gram-Schmidt sweeps (the published setting)
DEFAULT_RIDGE = reference_solvers.DEFAULT_RIDGE     # ridge regulariser
# "none" as a solver: variant "proma" that removes nothing (plain accumulation through the layer rules)
NO_SOLVER = "none"


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


def normalised_gram(K: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    s = torch.where(keep, norms, 1.0)
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
    s, mask, N = normalised_gram(K, settings.P)
    lam, Q = torch.linalg.eigh(N)
    use = lam > eigen_cutoff(K.shape[0], settings.P, settings.work_dtype) * lam[-1]
    inv = torch.where(use, 1.0 / torch.where(use, lam, 1.0), 0.0)
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
    s, mask, N = normalised_gram(K, settings.P)
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
    s, mask, N = normalised_gram(K, settings.P)
    L, _ = torch.linalg.cholesky_ex(N + settings.ridge * torch.eye(N.shape[0], dtype=N.dtype, device=N.device))
    a = torch.cholesky_solve((h * mask / s)[:, None], L)[:, 0]
    return a * mask / s, mask.sum().to(torch.int64)


# The torch implementations, by declared name: solver(K, h, settings) -> (c, rank), float64 tensors in and out
# on K's device, no host reads. Every name here is declared in reference.solvers (its NumPy definition is the
# judge); "none" has no entry: the accumulator handles it without solving (NO_SOLVER in proma.options).
Solver = Callable[[torch.Tensor, torch.Tensor, SolverSettings], tuple[torch.Tensor, torch.Tensor]]
_TORCH_SOLVERS: dict[str, Solver] = {
    "exact": exact_coefficients,
    "gram_schmidt": gram_schmidt_coefficients,
    "ridge": ridge_coefficients,
}
# read-only live view: name -> torch solver
SOLVER_REGISTRY = MappingProxyType(_TORCH_SOLVERS)
# the built-in solvers with a torch implementation (a fixed tuple; :func:`solver_names` is the live list)
SOLVERS = tuple(_TORCH_SOLVERS)


def register(name: str, fn: Solver) -> None:
    """Register the torch implementation of the declared solver ``name`` (see :func:`add_solver`)."""
    reference_solvers.declaration(name)  # ValueError unless declared
    if name == NO_SOLVER:
        raise ValueError(f"solver {NO_SOLVER!r} is handled by the accumulator itself; it takes no implementation")
    if not callable(fn):
        raise ValueError(f"the torch implementation of solver {name!r} must be callable; got {type(fn).__name__}")
    if name in _TORCH_SOLVERS:
        raise ValueError(f"solver {name!r} already has a torch implementation; remove_solver({name!r}) first")
    _TORCH_SOLVERS[name] = fn


def add_solver(declaration: "reference_solvers.SolverDeclaration", fn: Solver) -> None:
    """Declare a solver (:func:`reference.solvers.declare`) and register its torch implementation ``fn``.

    After this call ``solver=declaration.name`` is accepted by ``reference.accumulate``,
    :class:`proma.AccumulatorOptions`, the TRL config and the oracle's case settings, and the oracle's
    generated cases include the solver (docs/extending.md walks through it).
    """
    reference_solvers.declare(declaration)
    try:
        register(declaration.name, fn)
    except ValueError:
        reference_solvers.undeclare(declaration.name)
        raise


def remove_solver(name: str) -> None:
    """Undo :func:`add_solver` (the built-ins stay)."""
    if name in SOLVERS:
        raise ValueError(f"solver {name!r} is built in and cannot be removed")
    _TORCH_SOLVERS.pop(name, None)
    reference_solvers.undeclare(name)


def solver_names() -> tuple:
    """Every solver the accumulator accepts now: the declared ones with a torch implementation, then "none"."""
    return tuple(n for n in reference_solvers.solver_names() if n in _TORCH_SOLVERS) + (NO_SOLVER,)


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
    solver : a name of :func:`solver_names` other than "none" ("exact", "gram_schmidt", "ridge", or added)
    passes, ridge : solver options (see module docstring).
    relative_bound : cap ``||R|| <= relative_bound * ||pg||`` (None: no cap).
    P : block size.  work_dtype : dtype the Gram's gradients were computed in.

    Returns
    -------
    Solution (float64 tensors on K's device). Nothing is read back to the host: the cap is a
    ``torch.where``, the rank a tensor.
    """
    if solver not in _TORCH_SOLVERS:
        if solver in reference_solvers.solver_names() and solver != NO_SOLVER:
            raise ValueError(f"solver {solver!r} is declared (reference.solvers) but has no torch implementation; "
                             "register one with proma.solvers.register or add_solver")
        raise ValueError(f"solver must be one of {tuple(_TORCH_SOLVERS)}; got {solver!r}")
    K = K if K.dtype == torch.float64 else K.to(torch.float64)
    K = 0.5 * (K + K.T)
    h, w = (v if v.dtype == torch.float64 and v.device == K.device else v.to(K.device, torch.float64)
            for v in (h, w))
    settings = SolverSettings(P=P, work_dtype=work_dtype, passes=passes, ridge=ridge)
    c, rank = _TORCH_SOLVERS[solver](K, h, settings)
    removed = _quad_norm(K, c)
    incoming = _quad_norm(K, w)
    if relative_bound is not None:
        cap = relative_bound * incoming
        scale = torch.where(removed > cap, cap / torch.where(removed > 0, removed, 1.0), 1.0)
        c, removed = c * scale, removed * scale
    return Solution(coef=c, removed_norm=removed, incoming_norm=incoming, rank=rank)
