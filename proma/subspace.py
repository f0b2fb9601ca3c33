"""Dominant eigenpairs of a factor's Gram in torch, on the factor's device: the intra variant's subspace search.

Index conventions: M (t, d) a factor (t token rows, d features), n the side of the Gram searched
(``d`` for ``M^T M``, ``t`` for ``M M^T``), k = rank, m Krylov blocks.

Two routes, picked from the shapes only (no host read):

- ``n <= DENSE_EIGH_MAX``: a dense ``eigh`` of the Gram formed in M's dtype (exact to M's precision);
- larger: block Lanczos with full reorthogonalisation on the factored operator ``v -> M^T (M v)`` (or
  ``M (M^T v)``), ``LANCZOS_BLOCKS`` blocks of k vectors, then Rayleigh-Ritz on the Krylov basis in float64.
  The start block is the caller's (the previous microbatch's vectors of the same layer, a warm start) or M's
  longest rows (columns), which lie in the Gram's range. The Ritz residual ``||C x - theta x|| / theta`` is
  returned as a device tensor so that the caller can report it without reading it back per layer.

Why a fixed number of steps: a convergence test would read a value back to the host for every layer. After
j steps Lanczos' angle error for the top eigenvector is at most ``tan(angle of the start) / T_j(1 + 2 gamma)``
(Chebyshev polynomial; gamma = (lam_1 - lam_{k+1}) / (lam_{k+1} - lam_n)); for the flattest spectra of a
freshly initialised model (sigma_2 / sigma_1 = 0.95, gamma ~ 0.11) ``T_j(1.22) ~ exp(0.65 j) / 2``, so
``4 log10(1 / eps)`` steps reach the dtype's resolution from a cold start; a warm start only helps. The tests check it against the dense answer.

``tokens`` (optional): the number of rows of M that carry data, as a tensor; rows of M beyond them are
zero (the caller masks padding instead of removing rows, which would need their count on the host).
"""
from __future__ import annotations

import math

import torch

# Largest Gram side decomposed densely: below it one eigh of the formed Gram costs less than the Krylov steps'
# kernel launches.
DENSE_EIGH_MAX = 96
# Krylov blocks of block Lanczos per decimal digit of the work dtype's resolution (28 for float32, 63 for
# float64; see the module docstring for why this many).
LANCZOS_BLOCKS_PER_DIGIT = 4.0


def lanczos_blocks(dtype: torch.dtype) -> int:
    """Krylov blocks for a factor in ``dtype``: ``LANCZOS_BLOCKS_PER_DIGIT * log10(1 / eps)``."""
    return int(math.ceil(LANCZOS_BLOCKS_PER_DIGIT * -math.log10(torch.finfo(dtype).eps)))


def _operator(M: torch.Tensor, right: bool, row_mask: torch.Tensor | None):
    """``V -> C V`` for C = M^T diag(mask) M (``right``) or diag(mask) M M^T diag(mask), V (n, k)."""
    if right:
        if row_mask is None:
            return lambda V: M.T @ (M @ V)
        return lambda V: M.T @ (row_mask[:, None] * (M @ V))
    if row_mask is None:
        return lambda V: M @ (M.T @ V)
    return lambda V: row_mask[:, None] * (M @ (M.T @ (row_mask[:, None] * V)))


def _start_block(M: torch.Tensor, k: int, right: bool, start: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal (n, k) start: ``start`` when given with the right shape, else M's k longest rows
    (``right``) or columns, which lie in the Gram's range; topk stays on the device."""
    n = M.shape[1] if right else M.shape[0]
    if start is not None and start.shape == (n, k):
        S = start.to(M.dtype)
    else:
        lengths = (M * M).sum(dim=1 if right else 0)
        pick = torch.topk(lengths, k).indices
        S = (M.index_select(0, pick).T if right else M.index_select(1, pick))
        # a generic combination keeps the block full rank when M has fewer than k non-zero rows
        S = S + torch.linspace(1e-3, 2e-3, n, dtype=M.dtype, device=M.device)[:, None] * S.abs().max()
    return torch.linalg.qr(S)[0]


def _lanczos(M: torch.Tensor, k: int, right: bool, start, row_mask, blocks: int):
    """Block Lanczos, full reorthogonalisation. Returns theta (k,) descending, X (n, k), residual (k,)
    relative to theta_1, all float64."""
    op = _operator(M, right, row_mask)
    Q = _start_block(M, k, right, start)
    basis, images = [Q], []
    for j in range(blocks):
        W = op(basis[-1])
        images.append(W)
        if j == blocks - 1:
            break
        B = torch.cat(basis, dim=1)
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            W = W - B @ (B.T @ W)
        Qn, Rn = torch.linalg.qr(W)
        # a block that fell into the span (invariant subspace found) gets zero weight, not noise
        basis.append(Qn * (Rn.diagonal().abs() > 0).to(Qn.dtype))
    B = torch.cat(basis, dim=1).double()
    CB = torch.cat(images, dim=1).double()
    T = B.T @ CB
    theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
    theta, Y = theta.flip(0)[:k], Y.flip(1)[:, :k]
    X = B @ Y
    resid = (CB @ Y - X * theta).norm(dim=0) / theta[0].abs().clamp_min(torch.finfo(torch.float64).tiny)
    return theta, X, resid


def top_eigenpairs(M: torch.Tensor, rank: int, right: bool, *, start: torch.Tensor | None = None,
                   row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of ``M^T M`` (``right``) or ``M M^T`` (masked rows of M count as zero).

    Parameters
    ----------
    M : (t, d) factor.  rank : k >= 1.  right : which Gram.
    start : (n, k) warm start (e.g. the previous microbatch's vectors), optional.
    row_mask : (t,) 0/1 mask of the rows that carry data, optional.

    Returns
    -------
    theta : (k,) float64 eigenvalues, descending.  X : (n, k) float64 eigenvectors.
    residual : (k,) float64 ``||C x - theta x|| / theta_1`` (0 for the dense route).
    """
    n = M.shape[1] if right else M.shape[0]
    k = min(rank, n)
    if n <= DENSE_EIGH_MAX or k >= n // 2:
        Mm = M if row_mask is None else M * row_mask[:, None].to(M.dtype)
        lam, Q = torch.linalg.eigh(Mm.T @ Mm if right else Mm @ Mm.T)
        theta, X = lam.double().flip(0)[:k], Q.double().flip(1)[:, :k]
        return theta, X, torch.zeros_like(theta)
    mask = None if row_mask is None else row_mask.to(M.dtype)
    return _lanczos(M, k, right, start, mask, min(lanczos_blocks(M.dtype), n // k))
