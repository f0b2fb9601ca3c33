"""Dominant eigenpairs of a factor's Gram in torch, on the factor's device: the intra variant's subspace search.

Index conventions: M (t, d) a factor (t token rows, d features), n the side of the Gram searched
(``d`` for ``M^T M``, ``t`` for ``M M^T``), k = rank, m Krylov blocks.

Two routes, picked from the shapes only (no host read):

- ``n <= DENSE_EIGH_MAX``: a dense ``eigh`` of the Gram, formed and solved in float64;
- larger: block Lanczos with full reorthogonalisation on ``v -> M^T (M v)`` (or ``M (M^T v)``; through
  the formed Gram when its side is small against the other dimension), ``lanczos_blocks(dtype)`` blocks of
  k vectors, then Rayleigh-Ritz on the Krylov basis in float64. The start block is M's longest rows
  (columns), which lie in the Gram's range. (A warm start from the previous microbatch's vectors was
  measured useless on a freshly initialised Qwen3: the top vectors of consecutive microbatches are
  nearly orthogonal, see reports/benchmarks.md.) The Ritz residual
  ``||C x - theta x|| / theta`` is returned as a device tensor (tests read it; the backward pass does not).

Why a fixed number of steps: a convergence test would read a value back to the host for every layer. After
j steps Lanczos' angle error for the top eigenvector is at most ``tan(angle of the start) / T_j(1 + 2 gamma)``
(Chebyshev polynomial; gamma = (lam_1 - lam_{k+1}) / (lam_{k+1} - lam_n)); for the flattest spectra of a
freshly initialised model (sigma_2 / sigma_1 = 0.95, gamma ~ 0.11) ``T_j(1.22) ~ exp(0.65 j) / 2``, so
``4 log10(1 / eps)`` steps reach the dtype's resolution from a cold start. On the flattest Grams measured
(lam_2 / lam_1 = 0.988, small Qwen3 at initialisation) 28 steps in float32 agree with the float64 dense
eigenvector to the float32 floor; the tests check the route against the dense answer.

``row_mask`` (optional): a (t,) 0/1 mask of the rows of M that carry data (the caller masks padding instead
of removing rows, which would need their count on the host).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .solvers import EPS64, GRAM_NOISE

# Largest Gram side decomposed densely: below it one eigh of the formed Gram costs less than the Krylov steps'
# kernel launches.
DENSE_EIGH_MAX = 160
# The Krylov steps multiply by the formed Gram when its side is at most 1 / FORMED_GRAM_RATIO of the other
# dimension of M (one GEMM then costs less than the steps' memory-bound products through M).
FORMED_GRAM_RATIO = 2
# Krylov blocks of block Lanczos per decimal digit of the work dtype's resolution (28 for float32, 63 for
# float64; see the module docstring for why this many).
LANCZOS_BLOCKS_PER_DIGIT = 4.0
# A new Krylov direction whose norm after reorthogonalisation is below BREAKDOWN x eps of its image's norm is
# rounding, not a direction (the space is invariant to working precision): it is dropped (see _lanczos).
BREAKDOWN = 64.0


def lanczos_blocks(dtype: torch.dtype) -> int:
    """Krylov blocks for a factor in ``dtype``: ``LANCZOS_BLOCKS_PER_DIGIT * log10(1 / eps)``."""
    return int(math.ceil(LANCZOS_BLOCKS_PER_DIGIT * -math.log10(torch.finfo(dtype).eps)))


def _operator(M: torch.Tensor, right: bool, row_mask: torch.Tensor | None):
    """``V -> C V`` for C = M^T diag(mask) M (``right``) or diag(mask) M M^T diag(mask), V (n, k).

    The Gram is formed (one GEMM of t n^2) when that costs less than the Krylov steps' products through the
    factor (``2 t n`` per step, memory-bound): for ``n <= t / FORMED_GRAM_RATIO``.
    """
    t, d = M.shape
    n = d if right else t
    if right:  # the mask goes on the t-vectors M V: no masked copy of M
        if n * FORMED_GRAM_RATIO <= t:
            C = M.T @ (M if row_mask is None else M * row_mask[:, None])
            return lambda V: C @ V
        if row_mask is None:
            return lambda V: M.T @ (M @ V)
        return lambda V: M.T @ (row_mask[:, None] * (M @ V))
    Mm = M if row_mask is None else M * row_mask[:, None]
    if n * FORMED_GRAM_RATIO <= d:
        C = Mm @ Mm.T
        return lambda V: C @ V
    return lambda V: Mm @ (Mm.T @ V)


def _start_block(M: torch.Tensor, k: int, right: bool, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal (n, k) start: M's k longest (unmasked) rows (``right``) or columns, which lie in the Gram's
    range (topk stays on the device), plus a small generic combination that keeps the block full rank."""
    n = M.shape[1] if right else M.shape[0]
    if right:
        lengths = torch.linalg.vector_norm(M, dim=1)
        pick = torch.topk(lengths if row_mask is None else lengths * row_mask, k).indices
        S = M.index_select(0, pick).T
    else:
        Mm = M if row_mask is None else M * row_mask[:, None]
        S = Mm.index_select(1, torch.topk(torch.linalg.vector_norm(Mm, dim=0), k).indices)
    S = S + torch.linspace(1e-3, 2e-3, n, dtype=M.dtype, device=M.device)[:, None] * S.abs().max()
    return torch.linalg.qr(S)[0]


def _lanczos(M: torch.Tensor, k: int, right: bool, row_mask, blocks: int):
    """Block Lanczos, full reorthogonalisation (classical Gram-Schmidt twice per block). Returns theta (k,)
    descending, X (n, k), residual (k,) relative to theta_1, all float64."""
    op = _operator(M, right, row_mask)
    n = M.shape[1] if right else M.shape[0]
    # rows are basis vectors: every block is a contiguous (k, n) slice, so the products see dense operands
    basis = M.new_zeros(blocks * k, n)
    images = M.new_empty(blocks * k, n)
    basis[:k] = _start_block(M, k, right, row_mask).T
    tiny, eps = torch.finfo(M.dtype).tiny, torch.finfo(M.dtype).eps
    for j in range(blocks):
        lo, hi = j * k, (j + 1) * k
        W = op(basis[lo:hi].T)
        images[lo:hi] = W.T
        if j == blocks - 1:
            break
        B = basis[:hi]
        before = W.norm(dim=0)
        W = torch.addmm(W, B.T, B @ W, alpha=-1.0)
        W = torch.addmm(W, B.T, B @ W, alpha=-1.0)
        # breakdown: what is left after two Gram-Schmidt passes is rounding when it is below BREAKDOWN x eps of
        # the image it came from (the Krylov space is numerically invariant); normalising it would add a
        # direction that is neither new nor orthogonal and corrupt the Rayleigh-Ritz step, so it becomes 0
        # (and so does every later block: the operator maps 0 to 0). A mask, not a branch: no host read.
        floor = BREAKDOWN * eps * before
        if k == 1:
            norm = W.norm()
            torch.mul(W.T, ((norm > floor) / norm.clamp_min(tiny)).to(W.dtype), out=basis[hi:hi + 1])
        else:
            Qn, Rn = torch.linalg.qr(W)
            basis[hi:hi + k] = (Qn * (Rn.diagonal().abs() > floor).to(Qn.dtype)).T
    B, CB = basis.T.double(), images.T.double()
    T = B.T @ CB
    theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
    theta, Y = theta.flip(0)[:k], Y.flip(1)[:, :k]
    X = B @ Y
    resid = (CB @ Y - X * theta).norm(dim=0) / theta[0].abs().clamp_min(torch.finfo(torch.float64).tiny)
    return theta, X, resid


def top_eigenpairs(M: torch.Tensor, rank: int, right: bool, *,
                   row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of ``M^T M`` (``right``) or ``M M^T`` (masked rows of M count as zero).

    Parameters
    ----------
    M : (t, d) factor.  rank : k >= 1.  right : which Gram.
    row_mask : (t,) 0/1 mask of the rows that carry data, optional.

    Returns
    -------
    theta : (k,) float64 eigenvalues, descending.  X : (n, k) float64 eigenvectors.
    residual : (k,) float64 ``||C x - theta x|| / theta_1`` (0 for the dense route).
    """
    n = M.shape[1] if right else M.shape[0]
    k = min(rank, n)
    if n <= DENSE_EIGH_MAX or k >= n // 2:
        # float64: LAPACK's float32 eigh failed to converge on a real intra Gram during training (a crash),
        # and the Gram of a side <= DENSE_EIGH_MAX costs little in float64
        Mm = (M if row_mask is None else M * row_mask[:, None].to(M.dtype)).double()
        lam, Q = torch.linalg.eigh(Mm.T @ Mm if right else Mm @ Mm.T)
        theta, X = lam.flip(0)[:k], Q.flip(1)[:, :k]
        return theta, X, torch.zeros_like(theta)
    mask = None if row_mask is None else row_mask.to(M.dtype)
    return _lanczos(M, k, right, mask, min(lanczos_blocks(M.dtype), n // k))


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
    :func:`top_eigenpairs` (cheaper than an SVD of M; exact to M's precision). A singular
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
