"""One optimizer step's gradient and diagnostics: the micro-step loop of a minibatch, the accumulator's
statistics as ``proj/*`` metrics, and the KL measurements of the step just taken.

Methods differ only in the micro-step: ``grpo`` backpropagates the token-level clipped surrogate; the others
hand each microbatch's (b,) sequence log-probs and per-sequence weights (see ``losses``) to
``proma.ProjectedAccumulator`` (variant none / proma / intra), which leaves the accumulated gradient in p.grad.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import TrainConfig
from .distributed import Ranks
from .losses import clipped_fraction_tokens, grpo_loss, sequence_logprob, token_logprobs
from .metrics import categorical_kl, directional_derivatives, second_order_kl
from .rollout import select
from .sampling import RolloutBatch, microbatches, minibatch_weights

# Accumulator summary entries that are counts: the last microbatch's value is reported, not the mean.
_COUNT_KEYS = ("projected", "plain", "excluded", "microbatches")


def accumulator_class():
    """``proma.ProjectedAccumulator``: the method's public API, nothing else of proma/."""
    from proma import ProjectedAccumulator

    return ProjectedAccumulator


def accumulate_gradient(cfg: TrainConfig, model, ro: RolloutBatch, rows: list[int], *, on_microbatch=None,
                        ranks: Ranks = Ranks()):
    """Run the micro-step loop of minibatch ``rows``; leaves the gradient (averaged over ranks) in p.grad.

    Returns a dict with ``loss`` (the minibatch loss), ``clip_ratio``, ``pre_logp`` (per microbatch, the
    pre-step (n_scored, V) log-softmax rows, when ``cfg.kl_metrics``) and ``proj`` (accumulator stats).
    """
    weights, coef = minibatch_weights(cfg, ro, rows, ranks)
    pos = {r: k for k, r in enumerate(rows)}
    out = {"loss": 0.0, "n_clipped": 0.0, "pre_logp": [], "pre_tok_logp": [], "proj": {}}
    summaries = []
    acc_kwargs = cfg.accumulator_kwargs
    acc = accumulator_class()(model, **acc_kwargs) if acc_kwargs is not None else None
    try:
        if acc is not None:
            acc.zero_grad()
        for mb_rows in microbatches(cfg, rows):
            mb = select(ro.batch, mb_rows)
            k = [pos[r] for r in mb_rows]
            logp, full = token_logprobs(model, mb, full=cfg.kl_metrics)
            mask, adv = mb["score_mask"], ro.advantages[mb_rows].to(mb["score_mask"].device)
            if acc is None:  # grpo: token-level clipped surrogate, plain backward
                loss, n_clipped = grpo_loss(logp, mb["old_logp"], adv, coef[k].to(mask.device), mask, cfg.clip_eps)
                loss.backward()
            else:  # sequence log-probs and per-sequence weights through the accumulator
                seq_logp = sequence_logprob(logp, mask)
                w = weights[k].to(device=seq_logp.device, dtype=seq_logp.dtype)
                acc.backward(seq_logp, w)
                summaries.append(acc.stats().get("summary", {}))
                loss = (w * seq_logp.detach()).sum()
                n_clipped = clipped_fraction_tokens(logp.detach(), mb["old_logp"], adv, mask, cfg.clip_eps)
            if on_microbatch is not None:
                on_microbatch(mb, weights[k], adv)
            out["loss"] += float(loss.detach())
            out["n_clipped"] += float(n_clipped)
            if cfg.kl_metrics:
                out["pre_logp"].append(full.detach())
                out["pre_tok_logp"].append(logp.detach())
        if acc is not None:
            acc.synchronize()  # the mean over ranks (no-op in one process)
        else:
            ranks.average_gradients(model)
        out["proj"] = summarize_stats(summaries)
    finally:
        if acc is not None:
            acc.close()
    out["clip_ratio"] = out.pop("n_clipped") / max(1.0, float(ro.n_tokens[rows].sum()))
    return out


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


def step_diagnostics(cfg: TrainConfig, model, ro: RolloutBatch, rows: list[int], pre: dict, before: dict | None):
    """Exact local KL, its k1 estimate, KL to the rollout policy and the second-order estimate (metrics.py)."""
    rec = {}
    if cfg.kl_metrics:
        kl_tok, k1_tok, kl_roll, kl_seq = [], [], [], []
        with torch.no_grad():
            for j, mb_rows in enumerate(microbatches(cfg, rows)):
                mb = select(ro.batch, mb_rows)
                logp_after, full_after = token_logprobs(model, mb, full=True)
                sel = mb["score_mask"][:, 1:] > 0
                seq_of_row = sel.nonzero()[:, 0]
                kl = categorical_kl(pre["pre_logp"][j].double(), full_after.double())
                kl_tok.append(kl)
                k1_tok.append((pre["pre_tok_logp"][j][:, 1:][sel] - logp_after[:, 1:][sel]).double())
                kl_seq.append(torch.zeros(len(mb_rows), dtype=torch.float64, device=kl.device)
                              .index_add_(0, seq_of_row, kl))
                roll = torch.cat([ro.rollout_logp[r] for r in mb_rows]).to(full_after.device)
                kl_roll.append(categorical_kl(roll.double(), full_after.double()))
        rec["local_kl"] = float(torch.cat(kl_tok).mean())
        rec["local_kl_seq"] = float(torch.cat(kl_seq).mean())
        rec["local_kl_k1"] = float(torch.cat(k1_tok).mean())
        rec["kl"] = float(torch.cat(kl_roll).mean())
    if before is not None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        direction = {n: (params[n].detach() - before[n]) for n in before}
        dirs = [directional_derivatives(model, select(ro.batch, mb_rows), before, direction)
                for mb_rows in microbatches(cfg, rows)]
        rec["local_kl_2nd_order"] = second_order_kl(torch.cat(dirs))
    return rec
