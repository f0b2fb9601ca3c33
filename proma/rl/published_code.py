"""``proma-code``: the published PROMA code (a verl fork) as a method, so that it can be compared with the method.

Measured from outside (issue 32, docs/verl.md): with PROMA on, the fork puts all-ones advantages into its PPO
loss for every parameter, then overwrites only the ``nn.Linear`` weights' gradients with the projected running
gradient (the published settings: Gram-Schmidt, two sweeps, removal capped at half the microbatch gradient's
norm, equal to ``proma-paper`` on those weights). So, per parameter:

- every ``nn.Linear`` weight: the published-settings projection against the per-sequence gradients of that
  Linear use alone; a tied embedding / output head therefore gets the **head's** projected running gradient and
  nothing from the embedding use;
- every other parameter (RMSNorm weights; an untied embedding): the gradient of the run's GRPO surrogate loss
  with every advantage replaced by 1 (``losses.grpo_loss``: same per-token coefficients, ratio and clipping),
  summed over the minibatch's microbatches;
- biases would be zeroed (a Linear bias is not a Linear weight); the Qwen3 policy has none.

How it is computed here, with the library's public API only: while the method runs, the output head holds an
*alias* of the tied weight (a second ``nn.Parameter`` over the same storage), so the accumulator sees the head's
weight as its own Linear parameter; the embedding and every non-Linear parameter are ``exclude``d (plain, and
overwritten). The all-ones gradient comes from a second forward per microbatch, outside the accumulator's
capture. After the minibatch, :meth:`PublishedCode.finish` moves the alias's gradient onto the tied weight and
puts the all-ones gradients on the others. The optimizer holds the model's own parameters (never the alias).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from proma import ProjectedAccumulator

from .losses import grpo_loss, token_logprobs


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every ``nn.Linear`` module (each once)."""
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


class PublishedCode(contextlib.AbstractContextManager):
    """The ``proma-code`` micro-step: an accumulator over the Linear weights plus the fork's all-ones gradient.

    Parameters
    ----------
    model : the policy (an HF causal LM; its output head may be tied to the input embedding).
    accumulator_kwargs : ``ProjectedAccumulator`` options of the Linear projection (the published settings).
    clip_eps : PPO clip of the all-ones surrogate.

    Use as a context (it installs and removes the head alias). Per minibatch: :meth:`zero_grad`, then per
    microbatch :meth:`backward`, then :meth:`finish` (after ``acc.synchronize()``).
    """

    def __init__(self, model: nn.Module, accumulator_kwargs: dict, *, clip_eps: float):
        self.model, self.clip_eps = model, clip_eps
        self.head = model.get_output_embeddings()
        self.embedding = model.get_input_embeddings()
        if not isinstance(self.head, nn.Linear):
            raise ValueError(f"proma-code: the output head is {type(self.head).__name__}, not nn.Linear")
        self.tied = self.head.weight is self.embedding.weight
        self.alias = None
        if self.tied:
            # A second Parameter over the same storage: the head's use becomes a parameter of its own.
            self.alias = nn.Parameter(self.embedding.weight.detach(), requires_grad=True)
            self.head.weight = self.alias
        linear = {id(p) for p in linear_weights(model)}
        named = dict(model.named_parameters())
        # Excluded from the projection: everything but the Linear weights (the tied weight's own entry included:
        # its gradient is the alias's). The all-ones gradient: every excluded parameter but a tied weight.
        excluded = {n: p for n, p in named.items() if p.requires_grad and id(p) not in linear}
        self.others = {n: p for n, p in excluded.items() if not (self.tied and p is self.embedding.weight)}
        try:
            self.acc = ProjectedAccumulator(model, **{**accumulator_kwargs, "exclude": tuple(excluded)})
        except Exception:
            self._untie()
            raise
        self._ones: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.acc.zero_grad()
        self._ones = {}

    def paused(self):
        return self.acc.paused()

    def stats(self) -> dict:
        return self.acc.stats()

    def backward(self, model, batch: dict, seq_logp: torch.Tensor, weights: torch.Tensor, coef: torch.Tensor) -> None:
        """One microbatch: the Linear projection of ``sum_i w_i seq_logp_i``, and the all-ones gradient.

        ``seq_logp`` (b,) must come from a forward inside the accumulator's capture; ``coef`` (b,) are the
        run's per-token coefficients of these sequences (``batching.minibatch_weights``).
        """
        with self.acc.paused():  # the fork's all-ones loss, on a forward the accumulator does not see
            token_logp, _ = token_logprobs(model, batch)
            ones = torch.ones(token_logp.shape[0], dtype=token_logp.dtype, device=token_logp.device)
            loss, _ = grpo_loss(token_logp, batch["old_logp"], ones, coef.to(token_logp.device), batch["score_mask"],
                                self.clip_eps)
            grads = torch.autograd.grad(loss, list(self.others.values()), allow_unused=True)
        for (name, p), g in zip(self.others.items(), grads):
            g = torch.zeros_like(p) if g is None else g.detach()
            self._ones[name] = g if name not in self._ones else self._ones[name] + g
        self.acc.backward(seq_logp, weights)

    def synchronize(self) -> None:
        self.acc.synchronize()

    def finish(self) -> None:
        """Write the fork's gradients: the head's projected gradient on a tied weight, all-ones on the others."""
        for name, p in self.others.items():
            p.grad = self._ones[name].to(p.dtype) if name in self._ones else None
        if self.alias is not None:
            self.embedding.weight.grad = self.alias.grad
            self.alias.grad = None

    # ------------------------------------------------------------------------------------------------------
    def _untie(self) -> None:
        if self.alias is not None:
            self.head.weight = self.embedding.weight
            self.alias = None

    def close(self) -> None:
        self.acc.close()
        self._untie()

    def __exit__(self, *exc):
        self.close()
        return False
