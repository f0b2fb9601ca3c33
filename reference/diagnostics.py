"""Diagnostics on per-sequence gradients: second-order KL of an update and residual overlap.

Index conventions: b sequences, n flattened parameter size (P). ``seq_grads`` may also be shaped
(b, *param_shape) with vectors shaped ``param_shape`` (e.g. (b, o, i) from ``linear_seq_grads``).
"""
from __future__ import annotations

import numpy as np

from ._validate import as_array


def _flat_pair(seq_grads, v, v_name: str):
    seq_grads = as_array(seq_grads, "seq_grads")
    v = as_array(v, v_name)
    if seq_grads.ndim < 1 or seq_grads.shape[1:] != v.shape:
        raise ValueError(f"seq_grads must have shape (b, *{v_name}.shape) = (b, *{v.shape}); got {seq_grads.shape}")
    return seq_grads.reshape(seq_grads.shape[0], v.size), v.reshape(-1)


def second_order_kl(seq_grads, d) -> float:
    """Second-order estimate of the sequence-level KL caused by a parameter change ``d``.

    ``KL(pi_theta || pi_{theta+d}) ~ 0.5 * d^T F d`` with the empirical Fisher over the sampled sequences,
    ``F = mean_i g_i g_i^T``, i.e. ``0.5 * mean_i (g_i . d)^2``.

    Parameters
    ----------
    seq_grads : array_like, shape (b, n) or (b, *shape)
        Gradients g_i of each sequence's total log-probability; b >= 1.
    d : array_like, shape (n,) or shape

    Returns
    -------
    float
    """
    g, d = _flat_pair(seq_grads, d, "d")
    if g.shape[0] == 0:
        raise ValueError("seq_grads must hold at least one sequence (b >= 1)")
    return float(0.5 * np.mean((g @ d) ** 2))


def residual_overlap(seq_grads, G) -> float:
    """Largest cosine between the running gradient and a sequence gradient: ``max_i |g_i.G| / (||g_i|| ||G||)``.

    After an exact PROMA step against microbatch m, ``G - pg_m`` has zero overlap with microbatch m's
    sequences; approximate solvers leave a residual. Zero g_i are skipped; returns 0.0 when ``G = 0``,
    ``b = 0`` or every g_i is zero.

    Parameters
    ----------
    seq_grads : array_like, shape (b, n) or (b, *shape)
    G : array_like, shape (n,) or shape

    Returns
    -------
    float in [0, 1]
    """
    g, G = _flat_pair(seq_grads, G, "G")
    # scale before squaring so that tiny but non-zero vectors do not underflow to a zero norm
    g_peak = np.abs(g).max(axis=1) if g.size else np.zeros(g.shape[0])
    G_peak = np.abs(G).max(initial=0.0)
    keep = g_peak > 0
    if G_peak == 0 or not np.any(keep):
        return 0.0
    g_unit = g[keep] / g_peak[keep, None]
    g_unit /= np.linalg.norm(g_unit, axis=1)[:, None]
    G_unit = G / G_peak
    G_unit /= np.linalg.norm(G_unit)
    return float(min(1.0, np.max(np.abs(g_unit @ G_unit))))
