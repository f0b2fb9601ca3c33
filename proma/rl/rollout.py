"""The rollout of one training step: prompts, G sampled completions each, rewards, group advantages and the
rollout policy's log-probs, as a :class:`RolloutBatch`.

Used by the training loop and, unchanged, by the verification suite and the benchmarks, so that a "real
microbatch" outside training is exactly one that training would see. All randomness of rollout step s is drawn
from generators seeded by (seed, s, purpose), so the same seed gives the same rollouts, resumed or not. Rewards
are looked up as ``data.reward`` at call time: one seam for a replacement reward (the tests use one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import data
from .build import RunParts
from .config import TrainConfig
from .distributed import Ranks
from .generation import generate, pack, select
from .losses import group_advantages, token_logprobs
from .metrics import categorical_entropy

# What each per-step generator draws (the third seed word of ``step_rng``).
PROMPTS, SAMPLING, MINIBATCH_ORDER = 0, 1, 2


@dataclass
class RolloutBatch:
    batch: dict                 # sequence batch (generation.py layout) + "old_logp" (n, t) rollout-policy log-probs
    rewards: torch.Tensor       # (n,)
    advantages: torch.Tensor    # (n,)
    n_tokens: torch.Tensor      # (n,) scored tokens per sequence
    rollout_logp: list          # per sequence (n_i, V) rollout-policy log-softmax rows (kl_metrics only)
    entropy: float
    truncated_frac: float
    texts: list


def step_rng(cfg: TrainConfig, step: int, purpose: int) -> np.random.Generator:
    """Generator of step ``step`` for one ``purpose`` (PROMPTS, SAMPLING or MINIBATCH_ORDER)."""
    return np.random.default_rng([cfg.seed, step, purpose])


def collect_rollout(parts: RunParts, step: int, ranks: Ranks = Ranks()) -> RolloutBatch:
    """Rollout step ``step``: prompts, G completions each (temperature ``cfg.temperature``), rewards, group
    advantages and the rollout policy's log-probs (for GRPO's ratio, ``kl`` and ``entropy``)."""
    cfg, model, tok = parts.cfg, parts.model, parts.tokenizer
    idx = step_rng(cfg, step, PROMPTS).choice(len(parts.train_examples), size=cfg.prompts_per_step, replace=False)
    examples = [parts.train_examples[i] for i in idx[ranks.split(cfg.prompts_per_step, "prompts_per_step")]]
    # generate() samples from the global RNG; each rank draws its own stream
    torch.manual_seed(int(step_rng(cfg, step, SAMPLING).integers(2**62)) + ranks.rank)
    completions = generate(model, tok, [e.prompt for e in examples], group_size=cfg.group_size,
                           max_new_tokens=cfg.new_tokens, temperature=cfg.temperature, device=parts.device)
    answers = [e.answer for e in examples for _ in range(cfg.group_size)]
    rewards = torch.tensor([data.reward(cfg.task, t, a, format_reward=cfg.format_reward)
                            for t, a in zip(completions.texts, answers)], dtype=torch.float64)
    adv = group_advantages(rewards, cfg.group_size, kind=cfg.advantage, eps=cfg.adv_eps)
    batch = pack(completions.prompt_ids, completions.completion_ids, tok.pad_token_id, parts.device)
    # Rollout-policy log-probs, in microbatch-sized chunks to bound memory.
    n = len(completions.texts)
    old_logp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=parts.device)
    rollout_logp, ent_sum = [], 0.0
    with torch.no_grad():
        for lo in range(0, n, cfg.microbatch_size):
            rows = list(range(lo, min(n, lo + cfg.microbatch_size)))
            mb = select(batch, rows)
            logp, full = token_logprobs(model, mb, full=cfg.kl_metrics)
            old_logp[rows, : logp.shape[1]] = logp.float()
            if cfg.kl_metrics:
                ent_sum += float(categorical_entropy(full).sum())
                counts = mb["score_mask"][:, 1:].sum(1).long().tolist()
                rollout_logp.extend(torch.split(full.float(), counts))
    batch["old_logp"] = old_logp
    n_tokens = batch["score_mask"].sum(1)
    entropy = ent_sum / float(n_tokens.sum()) if cfg.kl_metrics else float("nan")
    return RolloutBatch(batch, rewards, adv, n_tokens, rollout_logp, entropy,
                        float(np.mean(completions.truncated)), completions.texts)
