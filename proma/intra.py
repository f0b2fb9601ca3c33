"""The intra variant's factored projection of one linear layer's microbatch gradient, in torch.

Index conventions: o out-features, i in-features, t token rows, r the rank of each side's subspace.

``variant="intra"`` replaces a linear weight's microbatch gradient ``grad = D^T X`` (o, i) by its projection
away from the dominant directions of its own factors: U (o, r) of D, V (i, r) of X (found by
:func:`proma.subspace.dominant_subspace`), ``(I - UU^T) grad (I - VV^T)`` (``"two_sided"``) or
``grad - UU^T grad VV^T`` (``"kron"``). The NumPy definition is :func:`reference.intra_project`; only the
token rows that carry gradient define U and V (:func:`gradient_rows`, as :func:`reference.gradient_rows`).
"""
from __future__ import annotations

import torch

from .subspace import dominant_subspace

# Below float64, the relative cutoff of a token row in units of the output gradients' eps (:func:`row_cutoff`).
ROUNDED_ZERO_EPS = 4


def row_cutoff(o: int, dtype: torch.dtype) -> float:
    """Relative cutoff of :func:`gradient_rows` for output gradients computed in ``dtype`` (o out-features).

    float64: the reference's, ``o * eps64`` (:func:`reference.default_row_rcond`), so that the torch rows equal the
    reference's rows. Below float64 the rows are already rounded: a row that is zero in exact arithmetic comes out
    near eps of the largest entry, and rows that the float64 reference keeps mostly lie a few times further up, so
    ``o * eps`` (2.3e-5 relative in float32 for o = 192) would drop real rows; the cut is :data:`ROUNDED_ZERO_EPS`
    ``* eps`` instead. It is not exact: a real row whose exact gradient is far below eps of the largest entry comes
    out of float32 at or near zero and is dropped. The measurement behind it: ``reports/intra_rows.md``.
    """
    eps = torch.finfo(dtype).eps
    return max(o, 1) * eps if dtype == torch.float64 else ROUNDED_ZERO_EPS * eps


def gradient_rows(D: torch.Tensor) -> torch.Tensor:
    """Token rows of D (t, o) that carry gradient, (t,) bool: ``max_j |D[t, j]| > c max_{t, j} |D[t, j]|`` with
    c = :func:`row_cutoff` of D's dtype (the precision the output gradients were computed in, whatever the work
    dtype). On the device, no host read.
    """
    row_max = D.abs().amax(dim=1)
    return row_max > row_cutoff(D.shape[1], D.dtype) * row_max.max()


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
    X : (t, i) activations, D : (t, o) output gradients; rows that carry no gradient (:func:`gradient_rows`)
        are left out of both subspaces.
    rank : number of dominant directions on each side; form : "two_sided" or "kron".

    Returns
    -------
    (o, i) tensor in grad's dtype: ``(I - UU^T) grad (I - VV^T)`` or ``grad - UU^T grad VV^T``.
    """
    if form not in ("two_sided", "kron"):
        raise ValueError(f"intra_form must be 'two_sided' or 'kron'; got {form!r}")
    if rank == 0 or X.shape[0] == 0:
        return grad.clone()
    keep = gradient_rows(D).to(grad.dtype)
    U = dominant_subspace(D, rank, row_mask=keep).V.to(grad.dtype)
    V = dominant_subspace(X, rank, row_mask=keep).V.to(grad.dtype)
    out = grad.clone()
    project_factored_(out, U, V, form)
    return out
