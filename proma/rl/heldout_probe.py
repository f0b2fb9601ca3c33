"""The out-of-sample local KL: how far one optimizer step moves the policy on completions it was not trained on.

The in-sample ``local_kl`` is measured on the minibatch just trained on, where PROMA cancels the cross-microbatch
effect by construction. This probe measures the same exact categorical KL on fresh completions of held-out
prompts (the task's **test** split, never trained on), sampled from the policy before the step:

    oos_local_kl = mean over the probe's scored tokens t of KL(pi_before(. | ctx_t) || pi_after(. | ctx_t))

At optimizer step ``opt_step`` the probe draws ``cfg.oos_kl_prompts`` prompts without replacement from a
generator seeded by ``(cfg.seed, opt_step, OOS_PURPOSE)`` (the same prompts for every method of a seed) and one
completion each at the rollout temperature. Sampling runs inside ``torch.random.fork_rng``, so a run's training
is bit-identical with and without the probe. Used by the training loop in two halves: :func:`sample_probe`
before the step (it keeps the pre-step log-softmax rows) and :func:`probe_kl` after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .generation import generate, pack
from .losses import token_logprobs
from .metrics import categorical_kl

# The fourth stream of per-step generators (rollout.py holds PROMPTS, SAMPLING, MINIBATCH_ORDER = 0, 1, 2).
OOS_PURPOSE = 3


@dataclass
class Probe:
    """Held-out completions and the pre-step policy's log-softmax rows ``pre_logp`` (n_scored, V) on them."""

    batch: dict
    pre_logp: torch.Tensor


def probe_seed(seed: int, opt_step: int) -> np.random.Generator:
    """Generator of the probe of optimizer step ``opt_step`` (0-based) of a run with ``seed``."""
    return np.random.default_rng([seed, opt_step, OOS_PURPOSE])


@torch.no_grad()
def sample_probe(cfg, model, tokenizer, heldout: list, opt_step: int, device) -> Probe:
    """Sample the probe of optimizer step ``opt_step`` from ``model`` (the policy before the step).

    ``heldout``: the held-out examples (``RunParts.heldout_examples``); ``cfg.oos_kl_prompts`` of them are drawn.
    """
    n = cfg.oos_kl_prompts
    if n > len(heldout):
        raise ValueError(f"oos_kl_prompts={n}: only {len(heldout)} held-out prompts in the test split")
    rng = probe_seed(cfg.seed, opt_step)
    idx = rng.choice(len(heldout), size=n, replace=False)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(rng.integers(2**62)))
        done = generate(model, tokenizer, [heldout[i].prompt for i in idx], group_size=1,
                        max_new_tokens=cfg.new_tokens, temperature=cfg.temperature, device=device)
    batch = pack(done.prompt_ids, done.completion_ids, tokenizer.pad_token_id, device)
    _, pre_logp = token_logprobs(model, batch, full=True)
    return Probe(batch, pre_logp.double())


@torch.no_grad()
def probe_kl(model, probe: Probe) -> float:
    """``oos_local_kl``: mean per-token KL(pi_before || pi_after) on the probe, ``model`` being pi_after."""
    _, post_logp = token_logprobs(model, probe.batch, full=True)
    return float(categorical_kl(probe.pre_logp, post_logp.double()).mean())
