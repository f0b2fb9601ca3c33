"""Sampling from the policy: the step-seeded rollout, its minibatches and microbatches, and sequence log-probs.

Used by the training loop and, unchanged, by the verification suite and the benchmarks, so that a "real
microbatch" outside training is exactly one that training would see. All randomness of rollout step s is drawn
from generators seeded by (seed, s, purpose), so the same seed gives the same rollouts, resumed or not. Rewards
are looked up as ``data.reward`` at call time: one seam for a replacement reward (the tests use one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from . import data
from .distributed import Ranks
from .losses import aggregation_coefficients, group_advantages, sequence_logprob, sequence_weights, token_logprobs
from .metrics import categorical_entropy
from .rollout import generate, pack, select
from .setup import Setup, setup

# What each per-step generator draws (the third seed word of ``step_rng``).
PROMPTS, SAMPLING, MINIBATCH_ORDER = 0, 1, 2


@dataclass
class RolloutBatch:
    batch: dict                 # sequence batch (rollout.py layout) + "old_logp" (n, t) rollout-policy log-probs
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


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """(b,) total log-probability of each sequence's scored (completion) tokens: what PROMA projects."""
    logp, _ = token_logprobs(model, batch)
    return sequence_logprob(logp, batch["score_mask"])


def do_rollout(s: Setup, step: int, ranks: Ranks = Ranks()) -> RolloutBatch:
    """Rollout step ``step``: prompts, G completions each (temperature ``cfg.temperature``), rewards, group
    advantages and the rollout policy's log-probs (for GRPO's ratio, ``kl`` and ``entropy``)."""
    cfg, model, tok = s.cfg, s.model, s.tokenizer
    idx = step_rng(cfg, step, PROMPTS).choice(len(s.train_examples), size=cfg.prompts_per_step, replace=False)
    examples = [s.train_examples[i] for i in idx[ranks.split(cfg.prompts_per_step, "prompts_per_step")]]
    # generate() samples from the global RNG; each rank draws its own stream
    torch.manual_seed(int(step_rng(cfg, step, SAMPLING).integers(2**62)) + ranks.rank)
    ro = generate(model, tok, [e.prompt for e in examples], group_size=cfg.group_size,
                  max_new_tokens=cfg.new_tokens, temperature=cfg.temperature, device=s.device)
    answers = [e.answer for e in examples for _ in range(cfg.group_size)]
    rewards = torch.tensor([data.reward(cfg.task, t, a, format_reward=cfg.format_reward)
                            for t, a in zip(ro.texts, answers)], dtype=torch.float64)
    adv = group_advantages(rewards, cfg.group_size, kind=cfg.advantage, eps=cfg.adv_eps)
    batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, s.device)
    # Rollout-policy log-probs, in microbatch-sized chunks to bound memory.
    n = len(ro.texts)
    old_logp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=s.device)
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
                        float(np.mean(ro.truncated)), ro.texts)


def minibatch_order(cfg: TrainConfig, step: int) -> np.ndarray:
    """Order of the rollout's sequences before slicing into minibatches (a permutation when shuffling)."""
    if not cfg.shuffle:
        return np.arange(cfg.rollout_size)
    return step_rng(cfg, step, MINIBATCH_ORDER).permutation(cfg.rollout_size)


def minibatch_rows(cfg: TrainConfig, order: np.ndarray, minibatch: int) -> list[int]:
    """Rollout rows of minibatch ``minibatch`` (0-based) of a rollout sliced in ``order``."""
    return [int(r) for r in order[minibatch * cfg.minibatch_size: (minibatch + 1) * cfg.minibatch_size]]


def microbatches(cfg: TrainConfig, rows: list[int]) -> list[list[int]]:
    """``rows`` cut into consecutive microbatches of ``cfg.microbatch_size``."""
    return [rows[i: i + cfg.microbatch_size] for i in range(0, len(rows), cfg.microbatch_size)]


def minibatch_weights(cfg: TrainConfig, ro: RolloutBatch, rows: list[int], ranks: Ranks = Ranks()):
    """(per-sequence weights w_i, per-token coefficients c_i) of the minibatch ``rows`` (losses.py)."""
    adv, n_tok = ro.advantages[rows], ro.n_tokens[rows].cpu()
    w, c = sequence_weights(adv, n_tok, cfg.aggregation), aggregation_coefficients(n_tok, cfg.aggregation)
    if cfg.aggregation == "token-mean":  # N is the global minibatch's token count (1 in one process)
        f = ranks.token_mean_factor(float(n_tok.sum()))
        w, c = w * f, c * f
    return w, c


def microbatch_weights(cfg: TrainConfig, ro: RolloutBatch, rows: list[int]) -> tuple[list, list]:
    """Minibatch ``rows`` cut into microbatches: ``(per microbatch its rows, per microbatch its (b_m,) weights)``."""
    weights, _ = minibatch_weights(cfg, ro, rows)
    pos = {r: k for k, r in enumerate(rows)}
    mbs = microbatches(cfg, rows)
    return mbs, [weights[[pos[r] for r in mb]] for mb in mbs]


def sample_microbatch(cfg: TrainConfig, *, step: int = 0, minibatch: int = 0, microbatch: int = 0, log=print):
    """A real microbatch of ``cfg``'s run: ``(model, batch, seq_logp_fn, weights)``.

    Builds the (warm-started, cached) policy exactly as ``train`` does, runs rollout ``step`` and returns
    microbatch ``microbatch`` of minibatch ``minibatch``: ``batch`` holds ``input_ids``, ``attention_mask``,
    ``score_mask`` (b, t) and ``old_logp``; ``weights`` (b,) are the aggregation's per-sequence weights of that
    minibatch; ``seq_logp_fn(model, batch) -> (b,)`` the sequence log-probs to pass to
    ``ProjectedAccumulator.backward(seq_logp_fn(model, batch), weights)``.
    """
    s = setup(cfg, log=log)
    ro = do_rollout(s, step)
    rows = minibatch_rows(cfg, minibatch_order(cfg, step), minibatch)
    mbs, weights = microbatch_weights(cfg, ro, rows)
    return s.model, select(ro.batch, mbs[microbatch]), sequence_logprobs, weights[microbatch]
