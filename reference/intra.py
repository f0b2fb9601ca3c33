"""The intra-microbatch variant: a factored projection of one linear layer's microbatch gradient.

Index conventions: t tokens of the microbatch, i in-features, o out-features.

This is *our reading* of the paper's description of its intra-microbatch variant ("a factored projection
using dominant subspaces of activations and gradient outputs, applied independently within each
microbatch"). For a linear layer with activations ``X`` (t, i), output gradients ``D`` (t, o) and
microbatch weight gradient ``grad = D^T X`` (o, i) (or any (o, i) matrix):

- ``U`` (o, r_U): the top-``rank`` left singular vectors of ``D^T`` (the dominant out-space directions);
- ``V`` (i, r_V): the top-``rank`` right singular vectors of ``X`` (the dominant in-space directions);
- ``"two_sided"``: ``(I - U U^T) grad (I - V V^T)``, which removes every rank-one direction that touches
  U on the left or V on the right;
- ``"kron"``: ``grad - U U^T grad V V^T``, which removes only the (U x V) block, i.e. projects the
  vectorised gradient against span{u_a (x) v_b} (the Kronecker-factored subspace).

The projected gradient is then added to the running gradient with no cross-microbatch projection.
Only the token rows that carry gradient define the subspaces (:func:`gradient_rows`): a row of ``D`` counts
when its largest entry exceeds ``row_rcond * max |D|`` (default ``o * eps``), so padding and positions whose
output gradient is zero in exact arithmetic (the first token's query attends to one key only, so its q_proj
gradient is zero) define no direction even when an implementation's rounding leaves ~1e-17 there; without the
cutoff such a row's activation would enter V and not U, and where it lands would depend on rounding.
Only singular vectors whose singular value exceeds ``rcond * s_max`` (default ``max(t, dim) * eps``) are
used, so r_U = min(rank, numerical rank of D) and likewise for V; a zero D or X removes nothing. When the
rank-th and (rank+1)-th singular values tie the top-rank subspace is not unique (the SVD picks one).
"""
from __future__ import annotations

import numpy as np

from ._validate import as_array, as_int, as_real
from .projection import EPS, default_rcond

FORMS = ("two_sided", "kron")


def default_row_rcond(o: int) -> float:
    """Default relative cutoff for a token row of output gradients with ``o`` features: ``o * eps``."""
    return max(o, 1) * EPS


def gradient_rows(D, *, row_rcond=None) -> np.ndarray:
    """Token rows that carry gradient: ``max_j |D[t, j]| > row_rcond * max_{t, j} |D[t, j]|``.

    Parameters
    ----------
    D : array_like, shape (t, o)
        Output gradients.
    row_rcond : float, optional
        Relative cutoff (default :func:`default_row_rcond`, ``o * eps``): rows at or below it are rounding of
        an exact zero (padding, or a position the loss cannot reach through this layer), not data.

    Returns
    -------
    ndarray of bool, shape (t,); all False when D is zero.
    """
    D = as_array(D, "D", ndim=2)
    t, o = D.shape
    if t == 0 or o == 0:
        return np.zeros(t, dtype=bool)
    cut = default_row_rcond(o) if row_rcond is None else as_real(row_rcond, "row_rcond", minimum=0.0)
    row_max = np.abs(D).max(axis=1)
    return row_max > cut * row_max.max()


def _top_right_singular(A: np.ndarray, rank: int, rcond) -> np.ndarray:
    """Top-``rank`` right singular vectors of A (t, d) above the cutoff, as columns (d, r)."""
    t, d = A.shape
    if rank == 0 or t == 0 or d == 0:
        return np.zeros((d, 0))
    _, s, vt = np.linalg.svd(A, full_matrices=False)
    cut = (default_rcond(t, d) if rcond is None else rcond) * s[0]
    r = min(rank, int(np.count_nonzero(s > cut)) if s[0] > 0 else 0)
    return vt[:r].T


def _flatten_tokens(X, D):
    X = as_array(X, "X")
    D = as_array(D, "D")
    if X.ndim < 2 or D.ndim < 2:
        raise ValueError(f"X and D must be at least 2-D (tokens..., features); got X {X.shape}, D {D.shape}")
    if X.shape[:-1] != D.shape[:-1]:
        raise ValueError(f"X {X.shape} and D {D.shape} must share their leading (token) dimensions")
    return X.reshape(-1, X.shape[-1]), D.reshape(-1, D.shape[-1])


def intra_subspaces(X, D, *, rank, rcond=None, row_rcond=None):
    """Dominant subspaces ``(U, V)`` of the output gradients and the activations, over the token rows that
    carry gradient (:func:`gradient_rows`).

    Parameters
    ----------
    X : array_like, shape (t, i) or (..., i)
        Activations (leading dimensions are flattened into tokens).
    D : array_like, shape (t, o) or (..., o)
        Output gradients, same leading dimensions as X.
    rank : int >= 0
    rcond : float, optional
        Relative singular-value cutoff (default ``max(t, d) * eps``, t the rows that carry gradient).
    row_rcond : float, optional
        Relative cutoff of :func:`gradient_rows`.

    Returns
    -------
    U : ndarray, shape (o, r_U), orthonormal columns
    V : ndarray, shape (i, r_V), orthonormal columns
    """
    X, D = _flatten_tokens(X, D)
    rank = as_int(rank, "rank", minimum=0)
    if rcond is not None:
        rcond = as_real(rcond, "rcond", minimum=0.0)
    rows = gradient_rows(D, row_rcond=row_rcond)
    X, D = X[rows], D[rows]
    # left singular vectors of D^T == right singular vectors of D
    return _top_right_singular(D, rank, rcond), _top_right_singular(X, rank, rcond)


def intra_project(grad, X, D, *, rank, form="two_sided", rcond=None, row_rcond=None) -> np.ndarray:
    """Project one linear layer's microbatch gradient against dominant factor subspaces.

    Parameters
    ----------
    grad : array_like, shape (o, i)
        The microbatch's weight gradient (typically ``D^T X`` weighted per sequence).
    X : array_like, shape (t, i) or (..., i)
    D : array_like, shape (t, o) or (..., o)
    rank : int >= 0
        Number of dominant directions on each side (0 returns ``grad`` unchanged).
    form : {"two_sided", "kron"}
        ``"two_sided"``: ``(I - U U^T) grad (I - V V^T)``; ``"kron"``: ``grad - U U^T grad V V^T``.
    rcond : float, optional
        Relative singular-value cutoff for U and V.
    row_rcond : float, optional
        Relative cutoff of :func:`gradient_rows` (which token rows define U and V).

    Returns
    -------
    ndarray, shape (o, i)
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    grad = as_array(grad, "grad", ndim=2)
    U, V = intra_subspaces(X, D, rank=rank, rcond=rcond, row_rcond=row_rcond)
    return intra_apply(grad, U, V, form=form)


def intra_apply(grad, U, V, *, form="two_sided") -> np.ndarray:
    """Apply the intra projection with given subspaces (as :func:`intra_project` does after finding them).

    The top-r subspaces for r < rank are the first r columns of the rank-``rank`` ones, so a study of several
    ranks finds them once (:func:`intra_subspaces`) and slices.

    Parameters
    ----------
    grad : array_like, shape (o, i)
    U : array_like, shape (o, r_U), orthonormal columns (output-gradient subspace)
    V : array_like, shape (i, r_V), orthonormal columns (activation subspace)
    form : {"two_sided", "kron"}

    Returns
    -------
    ndarray, shape (o, i): ``(I - U U^T) grad (I - V V^T)`` or ``grad - U U^T grad V V^T``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    grad = as_array(grad, "grad", ndim=2)
    U = as_array(U, "U", ndim=2)
    V = as_array(V, "V", ndim=2)
    if grad.shape != (U.shape[0], V.shape[0]):
        raise ValueError(f"grad must have shape (o, i) = ({U.shape[0]}, {V.shape[0]}) from U and V; got {grad.shape}")
    if form == "kron":
        return grad - U @ (U.T @ grad @ V) @ V.T
    left = grad - U @ (U.T @ grad)
    return left - (left @ V) @ V.T
