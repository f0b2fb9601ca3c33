"""A rollout cut into minibatches (one optimizer step each) and microbatches (one backward pass each), their
loss weights, and a real microbatch of a run outside training (``sample_microbatch``).

The minibatch order is drawn from the step's generator (``rollout.step_rng``), so it is the same resumed or not.
"""
from __future__ import annotations

import numpy as np

from .build import build_run
from .config import TrainConfig
from .distributed import Ranks
from .generation import select
from .losses import aggregation_coefficients, completion_logprobs, sequence_weights
from .rollout import MINIBATCH_ORDER, RolloutBatch, collect_rollout, step_rng


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


def minibatch_weights(cfg: TrainConfig, rollout: RolloutBatch, rows: list[int], ranks: Ranks = Ranks()):
    """(per-sequence weights w_i, per-token coefficients c_i) of the minibatch ``rows`` (losses.py)."""
    adv, n_tok = rollout.advantages[rows], rollout.n_tokens[rows].cpu()
    w, c = sequence_weights(adv, n_tok, cfg.aggregation), aggregation_coefficients(n_tok, cfg.aggregation)
    if cfg.aggregation == "token-mean":  # N is the global minibatch's token count (1 in one process)
        f = ranks.token_mean_factor(float(n_tok.sum()))
        w, c = w * f, c * f
    return w, c


def microbatch_weights(cfg: TrainConfig, rollout: RolloutBatch, rows: list[int]) -> tuple[list, list]:
    """Minibatch ``rows`` cut into microbatches: ``(per microbatch its rows, per microbatch its (b_m,) weights)``."""
    weights, _ = minibatch_weights(cfg, rollout, rows)
    pos = {r: k for k, r in enumerate(rows)}
    mbs = microbatches(cfg, rows)
    return mbs, [weights[[pos[r] for r in mb]] for mb in mbs]


def sample_microbatch(cfg: TrainConfig, *, step: int = 0, minibatch: int = 0, microbatch: int = 0, log=print):
    """A real microbatch of ``cfg``'s run: ``(model, batch, seq_logp_fn, weights)``.

    Builds the (warm-started, cached) policy exactly as ``train`` does, runs rollout ``step`` and returns
    microbatch ``microbatch`` of minibatch ``minibatch``: ``batch`` holds ``input_ids``, ``attention_mask``,
    ``score_mask`` (b, t) and ``old_logp``; ``weights`` (b,) are the aggregation's per-sequence weights of that
    minibatch; ``seq_logp_fn(model, batch) -> (b,)`` the completion log-probs (``losses.completion_logprobs``)
    to pass to ``ProjectedAccumulator.backward(seq_logp_fn(model, batch), weights)``.
    """
    parts = build_run(cfg, log=log)
    rollout = collect_rollout(parts, step)
    rows = minibatch_rows(cfg, minibatch_order(cfg, step), minibatch)
    mbs, weights = microbatch_weights(cfg, rollout, rows)
    return parts.model, select(rollout.batch, mbs[microbatch]), completion_logprobs, weights[microbatch]
