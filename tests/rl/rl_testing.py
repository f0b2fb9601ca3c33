"""Testkit of the RL harness tests (imported as a plain module: tests/ has no packages): the harness-shaped tiny
Qwen3, synthetic rollouts, and the parity reward that makes the smoke policy's updates non-empty."""
import contextlib

import torch

import proma.rl.data
from proma.rl.distributed import Ranks
from proma.rl.generation import pack
from proma.rl.losses import group_advantages, token_logprobs
from proma.rl.rollout import RolloutBatch
from proma.rl.train import method_accumulator, minibatch_gradient
from verification import testkit


def tiny_qwen3(vocab_size=64, dtype=torch.float64, seed=0, attn="eager"):
    """The harness-shaped tiny Qwen3 (``verification.testkit.TINY_SHAPES["harness"]``)."""
    return testkit.tiny_qwen3(dtype, seed, shape="harness", vocab_size=vocab_size, attn=attn)


def parity_reward(task, text, answer, **kw):
    """The smoke policy never solves a task; reward the parity of the completion's length instead."""
    return float(len(text) % 2)


@contextlib.contextmanager
def rewarding_parity():
    """Rollouts and evaluations score with :func:`parity_reward` inside the block (``proma.rl.data.reward``)."""
    orig = proma.rl.data.reward
    proma.rl.data.reward = parity_reward
    try:
        yield
    finally:
        proma.rl.data.reward = orig


def synthetic_rollout(model, *, n_prompts=4, group_size=4, seed=0, vocab_size=64) -> RolloutBatch:
    """Random prompts/completions of varied lengths, random 0/1 rewards, rollout log-probs of ``model``."""
    g = torch.Generator().manual_seed(seed)
    n = n_prompts * group_size
    prompts = [torch.randint(2, vocab_size, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(2, vocab_size, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    batch = pack(prompts, completions, 0, "cpu")
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    with torch.no_grad():
        old, full = token_logprobs(model, batch, full=True)
    batch["old_logp"] = old
    counts = batch["score_mask"][:, 1:].sum(1).long().tolist()
    return RolloutBatch(batch=batch, rewards=rewards, advantages=group_advantages(rewards, group_size),
                        n_tokens=batch["score_mask"].sum(1), rollout_logp=list(torch.split(full, counts)),
                        entropy=0.0, truncated_frac=0.0, texts=[""] * n)


def accumulate_gradient(cfg, model, ro: RolloutBatch, rows, ranks: Ranks = Ranks()) -> dict:
    """The training loop's micro-step loop over minibatch ``rows`` with an accumulator of ``cfg.method`` opened for
    this one minibatch (hooks removed afterwards): the gradient in p.grad, ``minibatch_gradient``'s dict returned."""
    with method_accumulator(cfg, model) as acc:
        return minibatch_gradient(cfg, model, ro, rows, acc, ranks=ranks)
