"""PROMA accumulation over microbatches: exact and the published approximations.

Index conventions: b_m sequences in microbatch m, n flattened parameter size (P).

With ``pg_m = weights_m @ seq_grads_m`` (the microbatch's policy gradient, g_i the gradient of sequence
i's total log-probability and w_i its loss weight), per block B (one parameter tensor)::

    G_0 = 0
    G_m[B] = G_{m-1}[B] - shrinkage * R_m[B] + pg_m[B]

where ``R_m[B]`` is the component of ``G_{m-1}[B]`` that the solver removes against
``{g_i[B] : i in microbatch m}``; with ``relative_bound`` it is scaled down so that
``||R_m[B]|| <= relative_bound * ||pg_m[B]||`` (so ``pg_m[B] = 0`` removes nothing).

Solvers: the declarations of :mod:`reference.solvers` ("none", "exact", "gram_schmidt", "ridge" and any
declared one), each ``remove(G[B], seq_grads[:, B], options) -> R_m[B]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import as_array, as_int, as_real
from .blocks import normalize_blocks
from .solvers import DECLARATIONS, DEFAULT_PASSES, DEFAULT_RIDGE, BUILTIN_SOLVERS, SolverOptions, declaration

# name -> declaration (a live, read-only view of reference.solvers' registry)
SOLVER_REGISTRY = DECLARATIONS
# the built-in solver names; the live list is reference.solvers.solver_names()
SOLVERS = BUILTIN_SOLVERS


@dataclass(frozen=True)
class AccumulationOptions:
    """The keyword options of :func:`accumulate`, :func:`accumulate_history` and :func:`accumulate_step`.

    Validated once on construction (``ValueError`` naming the option); ``blocks`` is checked against n later,
    by :func:`reference.normalize_blocks`.

    Attributes
    ----------
    blocks : None or sequence of slices or sizes
        Partition of ``range(n)``, one block per parameter tensor (layer-wise PROMA); ``None`` is one
        block, the exact global projection.
    solver : {"exact", "none", "gram_schmidt", "ridge"} or another declared name (:mod:`reference.solvers`).
    passes : int >= 1, sweeps of the Gram-Schmidt solver.
    ridge : float > 0, regulariser of the ridge solver.
    relative_bound : float >= 0 or None, cap ``||R_m[B]|| <= relative_bound * ||pg_m[B]||`` per block.
    shrinkage : float, multiplier of the removed component.
    rcond : float >= 0 or None, singular-value cutoff of the exact solver (see :func:`reference.project_out`).
    """

    blocks: object = None
    solver: str = "exact"
    passes: int = DEFAULT_PASSES
    ridge: float = DEFAULT_RIDGE
    relative_bound: float | None = None
    shrinkage: float = 1.0
    rcond: float | None = None

    def __post_init__(self):
        declaration(self.solver)  # ValueError naming the declared solvers
        checked = dict(passes=as_int(self.passes, "passes", minimum=1),
                       ridge=as_real(self.ridge, "ridge", minimum=0.0, strict=True))
        if self.relative_bound is not None:
            checked["relative_bound"] = as_real(self.relative_bound, "relative_bound", minimum=0.0)
        checked["shrinkage"] = as_real(self.shrinkage, "shrinkage")
        if self.rcond is not None:
            checked["rcond"] = as_real(self.rcond, "rcond", minimum=0.0)
        for name, value in checked.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True, eq=False)
class AccumulationStep:
    """One microbatch of PROMA accumulation; every field has shape (n,).

    Attributes
    ----------
    before : running gradient G_{m-1} entering the microbatch.
    pg : microbatch policy gradient pg_m = weights @ seq_grads.
    removed : R_m, the component removed by the solver, after the relative-bound cap and before shrinkage.
    after : G_m = before - shrinkage * removed + pg.
    """

    before: np.ndarray
    pg: np.ndarray
    removed: np.ndarray
    after: np.ndarray


def _check_microbatch(seq_grads, weights, n, where: str):
    seq_grads = as_array(seq_grads, f"seq_grads of {where}", ndim=2)
    weights = as_array(weights, f"weights of {where}", ndim=1)
    if n is not None and seq_grads.shape[1] != n:
        raise ValueError(f"seq_grads of {where} must have shape (b, {n}); got {seq_grads.shape}")
    if weights.shape[0] != seq_grads.shape[0]:
        raise ValueError(
            f"weights of {where} must have shape ({seq_grads.shape[0]},) to match seq_grads "
            f"{seq_grads.shape}; got {weights.shape}"
        )
    return seq_grads, weights


def _norm(x: np.ndarray) -> float:
    """Euclidean norm without underflow (numpy's 1-D norm squares first, so 1e-200 would give 0)."""
    peak = float(np.abs(x).max(initial=0.0))
    return peak * float(np.linalg.norm(x / peak)) if peak > 0 else 0.0


def removed_component(G, seq_grads, *, solver="exact", passes=DEFAULT_PASSES, ridge=DEFAULT_RIDGE,
                      rcond=None) -> np.ndarray:
    """The part R of ``G`` (shape (n,)) that ``solver`` removes against the rows of ``seq_grads`` (b, n).

    One block, no cap, no shrinkage; see the module docstring for the solvers.
    """
    remove = declaration(solver).remove
    if seq_grads.shape[0] == 0:
        return np.zeros_like(G)
    return remove(G, seq_grads, SolverOptions(passes=passes, ridge=ridge, rcond=rcond))


def accumulate_step(G, seq_grads, weights, **options) -> AccumulationStep:
    """One PROMA update ``G_m = G_{m-1} - shrinkage * R_m + pg_m``, block by block.

    Parameters
    ----------
    G : array_like, shape (n,)
        Running gradient G_{m-1} before this microbatch.
    seq_grads : array_like, shape (b_m, n)
        Per-sequence gradients g_i of the microbatch (flattened over all parameters).
    weights : array_like, shape (b_m,)
        Per-sequence loss weights w_i.
    **options
        The keywords of :class:`AccumulationOptions` (blocks, solver, passes, ridge, relative_bound,
        shrinkage, rcond).

    Returns
    -------
    AccumulationStep
    """
    opts = AccumulationOptions(**options)
    G = as_array(G, "G", ndim=1)
    seq_grads, weights = _check_microbatch(seq_grads, weights, G.shape[0], "the microbatch")
    return _step(G, seq_grads, weights, normalize_blocks(opts.blocks, G.shape[0]), opts)


def _step(G, seq_grads, weights, blocks, opts: AccumulationOptions) -> AccumulationStep:
    pg = weights @ seq_grads
    removed = np.zeros_like(G)
    for blk in blocks:
        r = removed_component(G[blk], seq_grads[:, blk], solver=opts.solver, passes=opts.passes, ridge=opts.ridge,
                              rcond=opts.rcond)
        if opts.relative_bound is not None:
            cap = opts.relative_bound * _norm(pg[blk])
            norm = _norm(r)
            if norm > cap:
                r = r * (cap / norm) if cap > 0 else np.zeros_like(r)
        removed[blk] = r
    return AccumulationStep(before=G.copy(), pg=pg, removed=removed, after=G - opts.shrinkage * removed + pg)


def _check_microbatches(microbatches) -> list:
    """``microbatches`` as a checked list of (seq_grads (b_m, n), weights (b_m,)) with one n."""
    if isinstance(microbatches, (str, bytes)) or not hasattr(microbatches, "__iter__"):
        raise ValueError("microbatches must be a sequence of (seq_grads, weights) pairs")
    checked, n = [], None
    for m, pair in enumerate(microbatches):
        try:
            seq_grads, weights = pair
        except (TypeError, ValueError) as exc:
            raise ValueError(f"microbatches[{m}] must be a (seq_grads, weights) pair") from exc
        seq_grads, weights = _check_microbatch(seq_grads, weights, n, f"microbatches[{m}]")
        n = seq_grads.shape[1]
        checked.append((seq_grads, weights))
    if not checked:
        raise ValueError("microbatches must hold at least one (seq_grads, weights) pair")
    return checked


def accumulate_history(microbatches, **options) -> list[AccumulationStep]:
    """PROMA accumulation, returning one :class:`AccumulationStep` per microbatch (G_0 = 0).

    ``steps[m].before`` is the running gradient entering microbatch m and ``steps[m].after`` the one
    leaving it (what oracle case files store); ``steps[-1].after`` is :func:`accumulate`'s result.
    Arguments as in :func:`accumulate`.
    """
    opts = AccumulationOptions(**options)
    checked = _check_microbatches(microbatches)
    n = checked[0][0].shape[1]
    parts = normalize_blocks(opts.blocks, n)
    G = np.zeros(n)
    steps = []
    for seq_grads, weights in checked:
        step = _step(G, seq_grads, weights, parts, opts)
        steps.append(step)
        G = step.after
    return steps


def accumulate(microbatches, **options) -> np.ndarray:
    """PROMA accumulation of microbatch policy gradients; returns the final G, shape (n,).

    Parameters
    ----------
    microbatches : sequence of (seq_grads, weights)
        ``seq_grads`` shape (b_m, n): gradients g_i of each sequence's total log-probability, flattened
        over all parameters (same n for every microbatch; b_m may differ, and may be 0). ``weights``
        shape (b_m,): per-sequence loss weights w_i, so ``pg_m = weights @ seq_grads``.
    **options
        The keywords of :class:`AccumulationOptions`: ``blocks`` (None: one block, the exact global
        projection; else slices or sizes partitioning n, one block per parameter tensor), ``solver``
        ({"exact", "none", "gram_schmidt", "ridge"}), ``passes`` (int >= 1), ``ridge`` (float > 0),
        ``relative_bound`` (float >= 0 or None), ``shrinkage`` (float), ``rcond`` (float >= 0 or None).

    Returns
    -------
    ndarray, shape (n,)
        G_M after the last microbatch.

    Raises
    ------
    ValueError
        Empty ``microbatches``, mismatched shapes, NaN/inf, ``blocks`` not partitioning n, unknown
        ``solver``, ``passes < 1``, ``ridge <= 0``, negative ``relative_bound``.
    TypeError
        An unknown keyword.
    """
    return accumulate_history(microbatches, **options)[-1].after
