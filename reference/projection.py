"""Exact orthogonal projection onto the complement of a row span.

Index conventions: b basis rows (sequences), n flattened parameter size (P), k vectors projected at once.

The row space of ``basis`` is taken from its thin SVD ``basis = W diag(s) Q``: the rows of ``Q`` whose
singular value exceeds the cutoff ``rcond * s_max`` form an orthonormal basis of the (numerical) row
span, and ``project_out(v) = v - (v Q_r^T) Q_r``. The default ``rcond = max(b, n) * eps`` (float64 eps,
the convention of ``numpy.linalg.matrix_rank`` and ``scipy.linalg.pinv``) keeps every direction that the
data determine above rounding noise. Because the projector is built from an orthonormal ``Q_r`` it is
exact for any basis: rank-deficient, duplicated or zero rows, ``b > n``, or ``b = 0``; the only
approximation is the rank decision for singular values within rounding of the cutoff.
"""
from __future__ import annotations

import numpy as np

from ._validate import as_array, as_real
from .blocks import normalize_blocks

EPS = float(np.finfo(np.float64).eps)


def default_rcond(b: int, n: int) -> float:
    """Default relative singular-value cutoff for a (b, n) basis: ``max(b, n) * eps``."""
    return max(b, n, 1) * EPS


def row_space(basis, *, rcond=None) -> np.ndarray:
    """Orthonormal basis of the numerical row span of ``basis``.

    Parameters
    ----------
    basis : array_like, shape (b, n)
    rcond : float, optional
        Singular values ``<= rcond * s_max`` count as zero. Default :func:`default_rcond`.

    Returns
    -------
    ndarray, shape (r, n)
        Orthonormal rows (``Q Q^T = I_r``), ``r`` = numerical rank (0 for ``b = 0`` or an all-zero basis).
    """
    basis = as_array(basis, "basis", ndim=2)
    b, n = basis.shape
    rcond = default_rcond(b, n) if rcond is None else as_real(rcond, "rcond", minimum=0.0)
    if b == 0 or n == 0:
        return np.zeros((0, n))
    _, s, vt = np.linalg.svd(basis, full_matrices=False)
    if s[0] == 0.0:
        return np.zeros((0, n))
    return vt[s > rcond * s[0]]


def project_out(v, basis, *, rcond=None, blocks=None) -> np.ndarray:
    """Project ``v`` onto the orthogonal complement of the row span of ``basis``.

    ``P(v) = v - Q_r^T Q_r v`` with ``Q_r`` from :func:`row_space`. With ``blocks`` the projection is done
    separately on each block (layer-wise PROMA): block ``B`` of the result is ``v[B]`` projected against
    the rows of ``basis[:, B]``. The layer-wise result is orthogonal to every full basis row and never
    longer than the global one, because span{g_i} lies inside the direct sum of the per-block spans.

    Parameters
    ----------
    v : array_like, shape (n,) or (k, n)
        Vector(s) to project; rows of a 2-D ``v`` are projected independently.
    basis : array_like, shape (b, n)
        Rows spanning the subspace to remove; ``b = 0`` returns ``v`` unchanged.
    rcond : float, optional
        Relative singular-value cutoff (per block); default ``max(b, n_block) * eps``.
    blocks : None or sequence of slices or sizes, optional
        Partition of ``range(n)``; see :func:`reference.blocks.normalize_blocks`. ``None``: global.

    Returns
    -------
    ndarray, same shape as ``v`` (float64, a new array).
    """
    v = as_array(v, "v", ndim=(1, 2))
    basis = as_array(basis, "basis", ndim=2)
    if basis.shape[1] != v.shape[-1]:
        raise ValueError(f"basis must have shape (b, {v.shape[-1]}) to match v {v.shape}; got {basis.shape}")
    if rcond is not None:
        rcond = as_real(rcond, "rcond", minimum=0.0)
    out = v.copy()
    for blk in normalize_blocks(blocks, v.shape[-1]):
        q = row_space(basis[:, blk], rcond=rcond)
        if q.shape[0]:
            out[..., blk] -= (v[..., blk] @ q.T) @ q
    return out
