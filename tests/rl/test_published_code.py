"""``proma-code``, the published code as a method, judged by the reference and by plain autograd.

What the fork does, per parameter (proma/rl/published_code.py): each Linear weight is projected with the published
settings against its own use's per-sequence gradients (a tied head: the head's use only); every other parameter
gets the gradient of the GRPO surrogate with all-ones advantages. The expected values here come from per-sequence
gradients of an untied copy (brute force, one autograd call per sequence) fed to ``reference.accumulate``, and from
a direct backward of the all-ones loss.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import reference
from proma.options import PUBLISHED_SETTINGS
from proma.rl.batching import microbatches, minibatch_weights
from proma.rl.config import TrainConfig
from proma.rl.generation import select
from proma.rl.losses import grpo_loss, sum_scored_logprobs, token_logprobs
from proma.rl.published_code import PublishedCode, linear_weights
from verification import testkit
from verification.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

from rl_testing import accumulate_gradient, synthetic_rollout

# A generic float64 model (every weight perturbed, so norms are not all ones), tied head, sdpa attention (see
# test_losses.py for why not eager in float64).
MODEL = testkit.tiny_qwen3(torch.float64, 0, shape="harness", attn="sdpa", perturb=testkit.GENERIC_PERTURBATION)
RO = synthetic_rollout(MODEL, n_prompts=4, group_size=4, seed=5)
ROWS = [3, 0, 7, 12, 9, 1, 14, 6]  # minibatch of 8 sequences from mixed groups: 2 microbatches of 4
REFERENCE_OPTIONS = {k: v for k, v in PUBLISHED_SETTINGS.items() if k != "variant"}


def _cfg(**changes):
    return TrainConfig.from_preset("smoke", method="proma-code", prompts_per_step=4, group_size=4, minibatches=2,
                                   microbatch_size=4, kl_metrics=False, **changes)


def _untied(model):
    """A copy whose head holds its own Parameter (same values): the head's use becomes separable."""
    out = copy.deepcopy(model)
    out.lm_head.weight = nn.Parameter(out.model.embed_tokens.weight.detach().clone())
    return out


def _expected_linear(cfg) -> dict:
    """Per Linear weight of the untied copy: reference.accumulate (published settings) of its own per-sequence
    gradients over the minibatch's microbatches."""
    model = _untied(MODEL)
    weights, _ = minibatch_weights(cfg, RO, ROWS)
    pos = {r: k for k, r in enumerate(ROWS)}
    params = [(f"{n}.weight", m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    per_param = {n: [] for n, _ in params}
    for mb in microbatches(cfg, ROWS):
        batch = select(RO.batch, mb)
        seq_logp = sum_scored_logprobs(token_logprobs(model, batch)[0], batch["score_mask"])
        w = weights[[pos[r] for r in mb]].numpy()
        for name, p in params:
            per_param[name].append((testkit.per_sequence_grads(model, seq_logp, [(name, p)]), w))
    return {name: reference.accumulate(mbs, **REFERENCE_OPTIONS) for name, mbs in per_param.items()}


def _expected_all_ones(cfg) -> dict:
    """Gradient of the GRPO surrogate with advantages 1, summed over the microbatches, for the non-Linear params."""
    model = copy.deepcopy(MODEL)
    _, coef = minibatch_weights(cfg, RO, ROWS)
    pos = {r: k for k, r in enumerate(ROWS)}
    linear = {id(p) for p in linear_weights(model)}
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in linear]
    total = 0.0
    for mb in microbatches(cfg, ROWS):
        batch = select(RO.batch, mb)
        logp, _ = token_logprobs(model, batch)
        loss, _ = grpo_loss(logp, batch["old_logp"], torch.ones(len(mb), dtype=torch.float64),
                            coef[[pos[r] for r in mb]], batch["score_mask"], cfg.clip_eps)
        total = total + loss
    grads = torch.autograd.grad(total, [p for _, p in others])
    return {n: g.numpy() for (n, _), g in zip(others, grads)}


def test_every_parameter_gets_the_published_codes_gradient():
    cfg = _cfg()
    model = copy.deepcopy(MODEL)
    accumulate_gradient(cfg, model, RO, ROWS)
    got = {n: p.grad.detach().numpy() for n, p in model.named_parameters()}
    linear = _expected_linear(cfg)
    ones = _expected_all_ones(cfg)
    # the tied weight's gradient is the head's projected running gradient (the embedding's part dropped)
    expected = {**{n: g for n, g in linear.items() if n != "lm_head.weight"},
                "model.embed_tokens.weight": linear["lm_head.weight"],
                **{n: g for n, g in ones.items() if n != "model.embed_tokens.weight"}}
    assert set(got) == set(expected)
    for name, exp in expected.items():
        np.testing.assert_allclose(got[name].reshape(-1), np.asarray(exp).reshape(-1), rtol=FLOAT64_RTOL,
                                   atol=FLOAT64_ATOL, err_msg=name)
    # the Linear projection removed something (the test would not see a plain sum otherwise)
    plain = _plain_head(cfg)
    assert np.linalg.norm(got["model.embed_tokens.weight"].reshape(-1) - plain) > 1e-3 * np.linalg.norm(plain)


def _plain_head(cfg) -> np.ndarray:
    """The head's unprojected minibatch gradient sum_m pg_m (to show the projection acted)."""
    model = _untied(MODEL)
    weights, _ = minibatch_weights(cfg, RO, ROWS)
    batch = select(RO.batch, ROWS)
    seq_logp = sum_scored_logprobs(token_logprobs(model, batch)[0], batch["score_mask"])
    (g,) = torch.autograd.grad((weights * seq_logp).sum(), [model.lm_head.weight])
    return g.numpy().reshape(-1)


def test_the_head_alias_is_removed_and_the_model_tied_again():
    model = copy.deepcopy(MODEL)
    n_params = len(list(model.parameters()))
    with PublishedCode(model, dict(PUBLISHED_SETTINGS), clip_eps=0.2) as code:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert code.tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == n_params


def test_an_untied_embedding_gets_the_all_ones_gradient():
    cfg = _cfg()
    model = _untied(MODEL)
    accumulate_gradient(cfg, model, RO, ROWS)
    linear = _expected_linear(cfg)
    # the untied model's embedding: the all-ones surrogate's gradient of the embedding use alone
    _, coef = minibatch_weights(cfg, RO, ROWS)
    pos = {r: k for k, r in enumerate(ROWS)}
    ref = _untied(MODEL)
    total = 0.0
    for mb in microbatches(cfg, ROWS):
        batch = select(RO.batch, mb)
        logp, _ = token_logprobs(ref, batch)
        total = total + grpo_loss(logp, batch["old_logp"], torch.ones(len(mb), dtype=torch.float64),
                                  coef[[pos[r] for r in mb]], batch["score_mask"], cfg.clip_eps)[0]
    (g_emb,) = torch.autograd.grad(total, [ref.model.embed_tokens.weight])
    np.testing.assert_allclose(model.model.embed_tokens.weight.grad.numpy(), g_emb.numpy(), rtol=FLOAT64_RTOL,
                               atol=FLOAT64_ATOL)
    np.testing.assert_allclose(model.lm_head.weight.grad.numpy().reshape(-1), linear["lm_head.weight"],
                               rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


def test_proma_code_refuses_several_processes(monkeypatch):
    from proma.rl import train as train_module
    from proma.rl.distributed import Ranks

    monkeypatch.setattr(train_module, "init_ranks", lambda device: Ranks(rank=0, world=2))
    with pytest.raises(ValueError, match="proma-code.*one process"):
        train_module.train(_cfg(out="/nonexistent/never-written"))
