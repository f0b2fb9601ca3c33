"""Token rows: the helpers of contribution kinds that travel as token factors (b, n, d).

Index conventions as in :mod:`proma.layers.base`: b sequences, n token positions per sequence, d features.
"""
from __future__ import annotations

import torch

# devices on which an outer-factor use drops its silent token positions before its products (a host read)
TRIM_DEVICES = ("cpu",)
# ... when at least this fraction of its positions is silent (below it the copies cost about what they save),
# judged first on every TRIM_SAMPLE_STRIDE-th position
TRIM_MIN_SILENT = 0.25
TRIM_SAMPLE_STRIDE = 8

def token_keep(rows_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose row of ``rows_factor`` (b, n, d) is non-zero, (b, n) bool, and their count per sequence (b,).

    Tokens with a zero output gradient (padding, and positions the loss does not reach) contribute nothing to
    g_i, K or h, so only the others travel; the receiver packs each sequence's tokens to the front (token
    order within a sequence does not matter for sums over tokens).
    """
    keep = (rows_factor != 0).any(dim=-1)
    return keep, keep.sum(dim=1)


def active_positions(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (b, n, o) and ``B`` (b, n, i) without the token positions that contribute nothing to any sequence.

    A position is silent when its row of ``A`` is exactly zero in every sequence and its rows of ``B`` are
    finite (so a NaN or inf that would reach ``A_t^T B_t`` as ``0 * inf`` is kept, and the microbatch's
    finiteness checks see it). Sums over tokens (``sum_t A_t^T B_t``, ``sum_t A_t . (G B_t)``) are the same
    without the silent positions up to rounding, at the cost of the others only: a language model's head gets
    a zero output gradient at every position whose log-probability the loss does not score (a prompt), and so
    does the token-wise part of the last decoder layer.

    Dropping positions copies the factors, which pays only when many are silent: every
    :data:`TRIM_SAMPLE_STRIDE`-th position is tested first (a pass over that fraction of ``A``), and the
    silent ones are looked for and dropped only when at least :data:`TRIM_MIN_SILENT` of the sample is.

    CPU only (:data:`TRIM_DEVICES`): the positions kept are a data-dependent shape (``nonzero``), which on
    an accelerator would make the host wait for the device; there, and when too few positions are silent,
    the factors are returned as they are (no copy).
    """
    n = A.shape[1]
    if A.device.type not in TRIM_DEVICES or n < TRIM_SAMPLE_STRIDE:
        return A, B

    def silent(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # (positions,) bool: A exactly zero in every sequence (a NaN is not), and B finite there
        return (a.abs().amax(dim=(0, 2)) == 0) & torch.isfinite(x.sum(dim=(0, 2)))

    sample = silent(A[:, ::TRIM_SAMPLE_STRIDE], B[:, ::TRIM_SAMPLE_STRIDE])
    if sample.nonzero().shape[0] < TRIM_MIN_SILENT * sample.shape[0]:
        return A, B
    idx = (~silent(A, B)).nonzero().squeeze(1)
    if idx.shape[0] > (1.0 - TRIM_MIN_SILENT) * n:
        return A, B
    return A.index_select(1, idx), B.index_select(1, idx)


def unpack_tokens(counts: torch.Tensor, rows: torch.Tensor, n: int, device) -> torch.Tensor:
    """Kept token rows (t, d) of b sequences with ``counts`` -> (b, n, d), each sequence's rows at the front."""
    counts = counts.to(device=device, dtype=torch.int64)
    b = counts.numel()
    out = torch.zeros((b, n) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    seq = torch.repeat_interleave(torch.arange(b, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(seq.numel(), device=device) - starts[seq]
    out[seq, pos] = rows.to(device)
    return out


def _tokens(piece, k: int, width: tuple, n: int, device) -> torch.Tensor:
    return unpack_tokens(piece.tensors[0], piece.tensors[k].reshape(-1, *width), n, device)
