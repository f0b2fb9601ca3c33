"""Policy-gradient maths: group-relative advantages, exact KL and entropy of categorical distributions.

Index conventions: b sequences (rollouts), V vocabulary; ``...`` any leading shape (e.g. (b, T)).
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from ._validate import as_array, as_int, as_real

SCALES = ("std", "none")


def group_advantages(rewards, group_size, *, eps=1e-6, scale="std", ddof=1) -> np.ndarray:
    """Group-relative advantages (GRPO and Dr. GRPO).

    Rollouts come in consecutive groups of ``group_size`` answers to the same prompt:
    ``rewards[k*G:(k+1)*G]`` is group k. With the group mean ``mu_k`` and standard deviation ``sigma_k``::

        scale="std"  (GRPO):     A_i = (r_i - mu_k) / (sigma_k + eps)
        scale="none" (Dr. GRPO): A_i =  r_i - mu_k

    ``sigma_k`` uses ``ddof=1`` (the unbiased estimate) by default, as ``torch.std`` in TRL and verl do.
    A group whose rewards are all equal gets advantages exactly 0 (also with ``eps = 0``).

    Parameters
    ----------
    rewards : array_like, shape (b,)
    group_size : int >= 1, dividing b (``> ddof`` when ``scale="std"``)
    eps : float >= 0
    scale : {"std", "none"}
    ddof : int >= 0

    Returns
    -------
    ndarray, shape (b,)
    """
    rewards = as_array(rewards, "rewards", ndim=1)
    group_size = as_int(group_size, "group_size", minimum=1)
    eps = as_real(eps, "eps", minimum=0.0)
    ddof = as_int(ddof, "ddof", minimum=0)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of rewards {rewards.shape[0]}")
    if scale == "std" and group_size <= ddof:
        raise ValueError(f"group_size must be > ddof = {ddof} for scale='std'; got {group_size}")
    groups = rewards.reshape(-1, group_size)
    # a constant group carries no signal: its advantages are exactly 0 (the rounded mean of identical
    # values can differ from them in the last bit, which eps = 0 would blow up)
    constant = np.ptp(groups, axis=1, keepdims=True) == 0
    centred = np.where(constant, 0.0, groups - groups.mean(axis=1, keepdims=True))
    if scale == "std":
        # divide by the group's largest deviation first so that tiny spreads do not underflow when squared:
        # A = (c / peak) / (std(c / peak) + eps / peak)
        peak = np.abs(centred).max(axis=1, keepdims=True)
        safe = np.where(peak > 0, peak, 1.0)
        unit = centred / safe
        with np.errstate(over="ignore"):
            denom = unit.std(axis=1, ddof=ddof, keepdims=True) + eps / safe
        centred = np.divide(unit, denom, out=np.zeros_like(unit), where=(peak > 0) & (denom > 0))
    return centred.reshape(-1)


def _logits_pair(logits_p, logits_q):
    p = as_array(logits_p, "logits_p")
    q = as_array(logits_q, "logits_q")
    if p.ndim < 1 or p.shape[-1] == 0:
        raise ValueError(f"logits_p must have a non-empty last (vocabulary) axis; got shape {p.shape}")
    if p.shape != q.shape:
        raise ValueError(f"logits_q must have the shape of logits_p {p.shape}; got {q.shape}")
    return p, q


def categorical_kl(logits_p, logits_q) -> np.ndarray:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last axis, p = softmax(logits_p).

    Parameters
    ----------
    logits_p, logits_q : array_like, shape (..., V), finite

    Returns
    -------
    ndarray, shape (...)
    """
    p, q = _logits_pair(logits_p, logits_q)
    lp, lq = log_softmax(p, axis=-1), log_softmax(q, axis=-1)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def categorical_entropy(logits) -> np.ndarray:
    """Exact entropy ``H(p) = -sum_v p_v log p_v`` over the last axis, p = softmax(logits).

    logits shape (..., V), finite; returns shape (...).
    """
    x = as_array(logits, "logits")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) axis; got shape {x.shape}")
    lp = log_softmax(x, axis=-1)
    return -np.sum(np.exp(lp) * lp, axis=-1)
