"""Per-step diagnostics: entropy, exact local KL of an optimizer step, its k1 estimate, KL to the rollout policy,
and the second-order estimate of the step's sequence-level KL.

Notation: n scored tokens (rows), V vocabulary, b sequences, P parameters; logp rows are log-softmax vectors.

* ``entropy``           mean over scored tokens of H(pi(.|ctx)) = -sum_v p_v log p_v (policy at rollout time).
* ``local_kl``          mean over the minibatch's scored tokens of the exact KL(pi_before || pi_after) summed
                        over the vocabulary, pi_before/after = the policy just before/after the optimizer step.
* ``local_kl_seq``      the same exact per-token KLs summed over each sequence's tokens, averaged over sequences:
                        the sequence-level KL (chain rule, evaluated on the sampled prefixes), the quantity the
                        second-order estimate approximates.
* ``local_kl_k1``       mean over scored tokens of log pi_before(y) - log pi_after(y) at the sampled tokens y
                        (the k1 estimator; unbiased for KL(before||after) only when y ~ pi_before, i.e. on the
                        first minibatch of a rollout).
* ``kl``                mean over scored tokens of the exact KL(pi_rollout || pi_after), the drift from the
                        policy that generated the data after this step (equals ``local_kl`` on minibatch 0).
* ``local_kl_2nd_order`` 0.5 * mean_i (g_i . dtheta)^2 with g_i = grad of sequence i's total log-probability at
                        theta_before and dtheta = theta_after - theta_before: the Fisher quadratic form
                        0.5 dtheta^T F dtheta, F estimated by the empirical mean of g_i g_i^T over the minibatch.
                        g_i . dtheta is computed EXACTLY as a forward-mode directional derivative
                        (``torch.func.jvp`` of the (b,) sequence log-probs, through ``functional_call`` at
                        theta_before, tangent dtheta), one forward-mode pass per microbatch, never forming g_i.
                        Forward-mode AD is not implemented for PyTorch's fused SDPA kernels, so SDPA runs its
                        "math" backend inside the jvp (same function; see ``forward_ad_attention``).
"""
from __future__ import annotations

import contextlib

import torch

from .losses import sum_scored_logprobs, token_logprobs


def categorical_entropy(logp: torch.Tensor) -> torch.Tensor:
    """(n,) entropy of each row of log-probabilities (n, V)."""
    return -(logp.exp() * logp).sum(-1)


def categorical_kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """(n,) exact KL(p || q) = sum_v p_v (log p_v - log q_v) of rows of log-probabilities (n, V)."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1)


@contextlib.contextmanager
def forward_ad_attention(model):
    """Attention that forward-mode AD can differentiate: PyTorch's fused SDPA kernels have no forward-mode
    derivative, so SDPA runs its "math" backend (the same function composed of differentiable ops); eager
    attention needs nothing; other implementations (flash-attention) are swapped for SDPA meanwhile."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = impl not in (None, "eager", "sdpa") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if switch:
            model.set_attn_implementation(impl)


def directional_derivatives(model, batch: dict, params_before: dict, direction: dict) -> torch.Tensor:
    """(b,) g_i . direction, g_i = d logp_i / d theta at ``params_before`` (exact, forward-mode AD).

    ``params_before`` and ``direction`` map parameter names (as ``model.named_parameters()``) to tensors.
    """
    def seq_logp(params):
        logp, _ = token_logprobs(model, batch, params=params)
        return sum_scored_logprobs(logp, batch["score_mask"])

    was_training = model.training
    model.eval()  # no dropout in the directional derivative
    try:
        with forward_ad_attention(model):
            _, tangent = torch.func.jvp(seq_logp, (params_before,), (direction,))
    finally:
        model.train(was_training)
    return tangent


def second_order_kl(directional: torch.Tensor) -> float:
    """0.5 * mean_i (g_i . dtheta)^2 from the (b,) directional derivatives of all minibatch sequences."""
    return 0.5 * float((directional.double() ** 2).mean())
