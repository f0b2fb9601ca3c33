"""Aggregation weights, microbatch invariance of the REINFORCE gradient, GRPO at ratio 1, advantages."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from proma.rl.config import TrainConfig
from proma.rl.losses import group_advantages, sequence_weights, token_logprobs
from proma.rl.generation import select
from verification.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

from rl_testing import accumulate_gradient, synthetic_rollout, tiny_qwen3

# sdpa, not eager: eager attention runs its softmax in float32 even in a float64 model, and the
# float32 row sums then depend on the padded length (the SIMD reduction order differs between CPUs),
# which would hide the float64 invariance this file checks.
MODEL = tiny_qwen3(attn="sdpa")
RO = synthetic_rollout(MODEL, n_prompts=4, group_size=4, seed=3)


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def direct_gradient(model, ro, rows, aggregation):
    """The minibatch loss written token by token, in one piece: -(1/N) sum_it A_i logp_it, or the
    seq-mean-token-mean form -(1/B) sum_i (1/n_i) sum_t A_i logp_it."""
    model.zero_grad(set_to_none=True)
    mb = select(ro.batch, rows)
    logp, _ = token_logprobs(model, mb)
    tok = logp * mb["score_mask"] * ro.advantages[rows].unsqueeze(1)
    if aggregation == "token-mean":
        loss = -tok.sum() / mb["score_mask"].sum()
    else:
        loss = -(tok.sum(1) / mb["score_mask"].sum(1)).mean()
    loss.backward()
    return grads(model)


def harness_gradient(model, ro, rows, **cfg_changes):
    cfg = TrainConfig.from_preset("smoke", prompts_per_step=4, group_size=4, minibatches=2, kl_metrics=False,
                                  **cfg_changes)
    model.zero_grad(set_to_none=True)
    accumulate_gradient(cfg, model, ro, rows)
    return grads(model)


@settings(max_examples=12)
@given(perm_seed=st.integers(0, 2**16), mb=st.sampled_from([1, 2, 4, 8]),
       aggregation=st.sampled_from(["token-mean", "seq-mean-token-mean"]))
def test_reinforce_minibatch_gradient_is_independent_of_the_microbatch_split(perm_seed, mb, aggregation):
    # one minibatch = a random half of a 16-sequence rollout (normalised by the MINIBATCH token count)
    rows = np.random.default_rng(perm_seed).permutation(16)[:8].tolist()
    expected = direct_gradient(MODEL, RO, rows, aggregation)
    got = harness_gradient(MODEL, RO, rows, method="reinforce", microbatch_size=mb, aggregation=aggregation)
    assert expected.norm() > 0
    torch.testing.assert_close(got, expected, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL * float(expected.norm()))


def test_per_microbatch_normalisation_would_differ():
    """The test above can fail: normalising each microbatch by its own token count changes the gradient."""
    rows = list(range(8))
    a, b = rows[:2], rows[2:]
    assert RO.n_tokens[a].sum() != RO.n_tokens[b].sum()  # otherwise both normalisations coincide
    full = direct_gradient(MODEL, RO, rows, "token-mean")
    wrong = (direct_gradient(MODEL, RO, a, "token-mean") + direct_gradient(MODEL, RO, b, "token-mean")) / 2
    assert not torch.allclose(full, wrong, rtol=1e-3)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_grpo_at_ratio_one_equals_reinforce(aggregation):
    rows = list(range(8, 16))
    reinforce = harness_gradient(MODEL, RO, rows, method="reinforce", microbatch_size=4, aggregation=aggregation)
    grpo = harness_gradient(MODEL, RO, rows, method="grpo", microbatch_size=2, aggregation=aggregation)
    torch.testing.assert_close(grpo, reinforce, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL * float(reinforce.norm()))


def test_grpo_clipping_zeroes_gradient_of_far_tokens():
    """With the rollout log-probs shifted far away (ratio >> 1+eps for A > 0, << 1-eps for A < 0), every token is
    clipped: zero gradient and clip_ratio 1 on sequences with non-zero advantage."""
    ro = synthetic_rollout(MODEL, n_prompts=4, group_size=4, seed=5)
    shift = torch.where(ro.advantages > 0, -5.0, 5.0).unsqueeze(1).to(ro.batch["old_logp"].dtype)
    ro.batch["old_logp"] = ro.batch["old_logp"] + shift
    rows = [i for i in range(16) if ro.advantages[i] != 0][:4]
    cfg = TrainConfig.from_preset("smoke", prompts_per_step=4, group_size=4, minibatches=4, microbatch_size=2,
                                  method="grpo", kl_metrics=False)
    MODEL.zero_grad(set_to_none=True)
    out = accumulate_gradient(cfg, MODEL, ro, rows)
    assert out["clip_ratio"] == pytest.approx(1.0)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in MODEL.parameters())


def test_sequence_weights_formulas():
    adv = torch.tensor([1.0, -2.0, 0.5])
    n = torch.tensor([2.0, 3.0, 5.0])
    np.testing.assert_allclose(sequence_weights(adv, n, "token-mean"), -adv.double() / 10.0)
    np.testing.assert_allclose(sequence_weights(adv, n, "seq-mean-token-mean"), -adv.double() / (3 * n.double()))


@given(st.lists(st.integers(0, 1), min_size=8, max_size=8), st.sampled_from(["grpo", "drgrpo"]))
def test_group_advantages_match_reference(rewards, kind):
    r = torch.tensor(rewards, dtype=torch.float64)
    got = group_advantages(r, 4, kind=kind)
    want = reference.group_advantages(np.array(rewards, float), 4, scale="std" if kind == "grpo" else "none")
    np.testing.assert_allclose(got.numpy(), want, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
