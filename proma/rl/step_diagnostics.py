"""What the training loop records about one optimizer step besides the loss: the accumulator's statistics as
``proj/*`` metrics, the gradient norm, and the KL measurements of the step just taken (``metrics``).
"""
from __future__ import annotations

import numpy as np
import torch

from .batching import microbatches
from .config import TrainConfig
from .generation import select
from .losses import token_logprobs
from .metrics import categorical_kl, directional_derivatives, second_order_kl
from .rollout import RolloutBatch

# Accumulator summary entries that are counts: the last microbatch's value is reported, not the mean.
_COUNT_KEYS = ("projected", "plain", "excluded", "microbatches")


def summarize_stats(summaries: list[dict]) -> dict:
    """``proj/<name>`` floats from the accumulator's per-microbatch ``stats()["summary"]`` dicts.

    ``stats()`` describes the last microbatch only, so it is read after every microbatch: norms and ratios are
    averaged over the minibatch's microbatches (``proj/removed_ratio``; for ``proma`` the first microbatch
    has nothing to project against and contributes 0), ``proj/removed_ratio_max`` is the largest, counts are
    the last microbatch's.
    """
    out = {}
    for key in summaries[0] if summaries else ():
        values = [s.get(key) for s in summaries]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        out[f"proj/{key}"] = float(values[-1]) if key in _COUNT_KEYS else float(np.mean(values))
        if key == "removed_ratio":
            out["proj/removed_ratio_max"] = float(np.max(values))
    return out


def gradient_norm(model) -> float:
    """Global L2 norm of the parameters' gradients (0 when none has one)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


def parameter_snapshot(model) -> dict:
    """Detached copies of the trainable parameters (the step's start point for the second-order estimate)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def step_diagnostics(cfg: TrainConfig, model, rollout: RolloutBatch, rows: list[int], pre_step: dict,
                     before: dict | None):
    """Exact local KL, its k1 estimate, KL to the rollout policy and the second-order estimate (metrics.py).

    ``pre_step`` is what the micro-step loop kept of the policy before the step (``pre_logp``, ``pre_tok_logp``
    per microbatch, when ``cfg.kl_metrics``); ``before`` the parameters before it (``second_order`` only).
    """
    rec = {}
    if cfg.kl_metrics:
        kl_tok, k1_tok, kl_roll, kl_seq = [], [], [], []
        with torch.no_grad():
            for j, mb_rows in enumerate(microbatches(cfg, rows)):
                mb = select(rollout.batch, mb_rows)
                logp_after, full_after = token_logprobs(model, mb, full=True)
                sel = mb["score_mask"][:, 1:] > 0
                seq_of_row = sel.nonzero()[:, 0]
                kl = categorical_kl(pre_step["pre_logp"][j].double(), full_after.double())
                kl_tok.append(kl)
                k1_tok.append((pre_step["pre_tok_logp"][j][:, 1:][sel] - logp_after[:, 1:][sel]).double())
                kl_seq.append(torch.zeros(len(mb_rows), dtype=torch.float64, device=kl.device)
                              .index_add_(0, seq_of_row, kl))
                roll = torch.cat([rollout.rollout_logp[r] for r in mb_rows]).to(full_after.device)
                kl_roll.append(categorical_kl(roll.double(), full_after.double()))
        rec["local_kl"] = float(torch.cat(kl_tok).mean())
        rec["local_kl_seq"] = float(torch.cat(kl_seq).mean())
        rec["local_kl_k1"] = float(torch.cat(k1_tok).mean())
        rec["kl"] = float(torch.cat(kl_roll).mean())
    if before is not None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        direction = {n: (params[n].detach() - before[n]) for n in before}
        dirs = [directional_derivatives(model, select(rollout.batch, mb_rows), before, direction)
                for mb_rows in microbatches(cfg, rows)]
        rec["local_kl_2nd_order"] = second_order_kl(torch.cat(dirs))
    return rec
