"""Log-probabilities, advantages, loss aggregation weights and the GRPO clipped surrogate.

Notation: b sequences in a microbatch, B in the minibatch (one optimizer step), t tokens, V vocabulary;
A_i the advantage of sequence i, n_i its number of scored (completion) tokens, N = sum_i n_i over the MINIBATCH.

Per-sequence weights (REINFORCE and the projection methods)
---------------------------------------------------------
The policy-gradient loss of a minibatch, for the two aggregations, is a weighted sum of each sequence's TOTAL
log-probability logp_i = sum_t log pi(y_it | y_i<t) (no importance ratio), because A_i is per sequence:

* ``token-mean``:           L = -(1/N) sum_i sum_t A_i logp_it          = sum_i w_i logp_i,  w_i = -A_i / N
* ``seq-mean-token-mean``:  L = -(1/B) sum_i (1/n_i) sum_t A_i logp_it  = sum_i w_i logp_i,  w_i = -A_i / (B n_i)

N and B are those of the whole minibatch, never of a microbatch: a microbatch's contribution is
sum_{i in mb} w_i grad logp_i, so the accumulated gradient does not depend on how the minibatch is split (the
normalisation bug of per-microbatch means; tested). These (seq_logp, w) pairs are exactly what
``ProjectedAccumulator.backward(seq_logp, weights)`` takes: PROMA's sequence gradients g_i are gradients of
logp_i and its microbatch gradient is sum_i w_i g_i.

GRPO
----
Token-level PPO clipped surrogate against the rollout policy, with the same aggregation weights per token
(1/N, or 1/(B n_i)):  L = -sum_i sum_t c_i min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i),  r_it = exp(logp_it -
logp_old_it). At r = 1 its gradient equals the token-mean / seq-mean-token-mean REINFORCE gradient above.
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
ADVANTAGES = ("grpo", "drgrpo")


def token_logprobs(model, batch: dict, *, params=None, full: bool = False):
    """Log-probability of every token under ``model``.

    Returns ``(logp, full_logp)``: ``logp`` (b, t) with logp[:, j] = log pi(input_ids[:, j] | input_ids[:, <j]),
    zero at column 0; ``full_logp`` (n_scored, V) the log-softmax rows at the scored tokens (row order =
    ``score_mask.nonzero()``), only when ``full=True``, else None. ``params`` (name -> tensor) evaluates the
    model functionally at other parameter values (``torch.func.functional_call``).
    """
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if params is None:
        logits = model(**kwargs).logits
    else:
        logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs).logits
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least fp32; fp32/fp64 models keep their precision
    targets = batch["input_ids"][:, 1:]
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    logp = torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
    full_logp = None
    if full:
        sel = batch["score_mask"][:, 1:] > 0
        full_logp = logits[sel] - lse[sel].unsqueeze(-1)
    return logp, full_logp


def sum_scored_logprobs(logp: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """(b,) sum over each sequence's scored tokens of the (b, t) token log-probs ``logp``: sum_t logp_it."""
    return (logp * score_mask).sum(dim=1)


def completion_logprobs(model, batch: dict) -> torch.Tensor:
    """(b,) total log-probability under ``model`` of each sequence's completion (its scored tokens): one forward.

    What PROMA projects: ``ProjectedAccumulator.backward(completion_logprobs(model, batch), weights)``.
    """
    logp, _ = token_logprobs(model, batch)
    return sum_scored_logprobs(logp, batch["score_mask"])


def group_advantages(rewards: torch.Tensor, group_size: int, *, kind: str = "grpo", eps: float = 1e-6):
    """Group-relative advantages of rewards laid out group-major ((n,) with n = groups * group_size).

    ``grpo``: A = (r - mean_g) / (std_g + eps) with the unbiased (n-1) std, as TRL and verl;
    ``drgrpo`` (Dr. GRPO): A = r - mean_g. Zero-variance groups get A = 0 in both.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage={kind!r}: choose from {', '.join(ADVANTAGES)}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} is not (groups * group_size={group_size},)")
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "grpo":
        std = r.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1).to(rewards.dtype)


def aggregation_coefficients(n_tokens: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(B,) per-token coefficient c_i of each minibatch sequence: 1/N (token-mean) or 1/(B n_i).

    ``n_tokens`` (B,) counts the scored tokens of every sequence of the MINIBATCH.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: choose from {', '.join(AGGREGATIONS)}")
    n = n_tokens.double()
    if aggregation == "token-mean":
        return torch.full_like(n, 1.0 / n.sum().clamp(min=1.0).item())
    return 1.0 / (n.numel() * n.clamp(min=1.0))


def sequence_weights(advantages: torch.Tensor, n_tokens: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(B,) weights w_i = -A_i c_i so that the minibatch loss is sum_i w_i logp_i (see module docstring)."""
    return -advantages.double() * aggregation_coefficients(n_tokens, aggregation)


def grpo_loss(logp, old_logp, advantages, coef, score_mask, clip_eps: float):
    """PPO clipped surrogate of one microbatch, summed with per-token coefficients ``coef`` (b,).

    Returns ``(loss, n_clipped)`` where ``n_clipped`` counts scored tokens whose clipped branch is active
    (the gradient through them is zero), the usual ``clip_ratio`` numerator.
    """
    ratio = torch.exp(logp - old_logp)
    a = advantages.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
    surrogate = torch.minimum(unclipped, clipped)
    loss = -(surrogate * coef.to(logp.dtype).unsqueeze(1) * score_mask).sum()
    n_clipped = ((clipped < unclipped).float() * score_mask).sum()
    return loss, n_clipped


def clipped_fraction_tokens(logp, old_logp, advantages, score_mask, clip_eps: float):
    """Number of scored tokens on which PPO clipping would be active (for methods that do not clip)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages.to(logp.dtype).unsqueeze(1)
    active = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
    return (active.float() * score_mask).sum()
