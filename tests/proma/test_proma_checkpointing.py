"""Activation checkpointing (transformers' gradient_checkpointing_enable, both torch.utils.checkpoint modes).

The accumulator's result with checkpointing on must equal the float64 reference (per-sequence gradients of
a twin model without checkpointing) and the result with checkpointing off, and every use must be captured
exactly once (the recomputation is not a second use).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import reference
from proma import ProjectedAccumulator
from proma_testkit import tiny_qwen3
from verification.testkit import flat_grad, per_sequence_grads, qwen_seq_logp, rel_err, trainable
from verification.tolerances import FLOAT64_RTOL

MODES = {"off": None, "non_reentrant": False, "reentrant": True}


def _batches(seed=5, sizes=(3, 2, 3), T=6):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        ids = torch.randint(0, 50, (b, T), generator=gen)
        lengths = torch.randint(2, T + 1, (b,), generator=gen)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        out.append((ids, mask, torch.randn(b, generator=gen, dtype=torch.float64)))
    return out


def _model(mode):
    model = tiny_qwen3(torch.float64)
    model.train()  # transformers checkpoints only in training mode
    if MODES[mode] is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": MODES[mode]})
    model.config.use_cache = False
    return model


def _accumulate(mode, **acc_kwargs):
    model = _model(mode)
    uses = []
    with ProjectedAccumulator(model, **acc_kwargs) as acc:
        acc.zero_grad()
        for ids, mask, w in _batches():
            acc.backward(qwen_seq_logp(model, ids, mask), w)
            uses.append({n: d.get("uses") for n, d in acc.stats()["params"].items()})
    return flat_grad(trainable(model)), uses


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointed_proma_matches_reference(mode):
    got, uses = _accumulate(mode, solver="exact")
    twin = _model("off")
    params = trainable(twin)
    oracle = [(per_sequence_grads(twin, qwen_seq_logp(twin, ids, mask), params), w.numpy())
              for ids, mask, w in _batches()]
    want = reference.accumulate(oracle, blocks=[p.numel() for _, p in params], solver="exact")
    assert rel_err(got, want) <= FLOAT64_RTOL, rel_err(got, want)
    _, uses_off = _accumulate("off", solver="exact")
    assert uses == uses_off  # each use captured once: the recomputation adds none


@pytest.mark.slow
@pytest.mark.parametrize("acc_kwargs", [dict(variant="intra", intra_rank=1), dict(variant="none")], ids=["intra", "none"])
def test_checkpointing_does_not_change_the_result(acc_kwargs):
    off, _ = _accumulate("off", **acc_kwargs)
    for mode in ("non_reentrant", "reentrant"):
        on, _ = _accumulate(mode, **acc_kwargs)
        assert rel_err(on, off) <= FLOAT64_RTOL, (mode, rel_err(on, off))


def test_reentrant_keeps_parameter_grads_and_rejects_mixed_calls():
    model = _model("reentrant")
    (ids, mask, w), (ids2, mask2, w2) = _batches(sizes=(2, 2))[:2]
    with ProjectedAccumulator(model, variant="proma") as acc:
        acc.zero_grad()
        acc.backward(qwen_seq_logp(model, ids, mask), w)
        first = flat_grad(trainable(model))
        assert np.linalg.norm(first) > 0
        # a module of a checkpointed layer also called outside it
        proj = model.model.layers[0].mlp.down_proj
        lp = qwen_seq_logp(model, ids2, mask2) + proj(torch.ones(2, 3, 64, dtype=torch.float64)).sum((1, 2))
        with pytest.raises(ValueError, match="both inside and outside a reentrant checkpointed region"):
            acc.backward(lp, w2)


class _Excluded(torch.nn.Module):
    """Embedding -> checkpointed MLP block -> head, times a per-token scale that has no layer rule."""

    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 5)
        self.block = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
        self.head = torch.nn.Linear(5, 7, bias=False)
        self.scale = torch.nn.Parameter(1 + 0.1 * torch.randn(7))
        self.reentrant = reentrant
        self.double()

    def forward(self, ids):
        h = self.emb(ids)
        if self.reentrant is None:
            h = h + self.block(h)
        else:
            h = h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h) * self.scale


def test_excluded_parameter_outside_reentrant_region_is_not_polluted():
    gen = torch.Generator().manual_seed(6)
    batches = [(torch.randint(0, 7, (b, 4), generator=gen), torch.randn(b, generator=gen, dtype=torch.float64))
               for b in (3, 2)]
    results = {}
    for mode in (None, False, True):
        model = _Excluded(mode)
        with ProjectedAccumulator(model, solver="exact", exclude=["scale"]) as acc:
            acc.zero_grad()
            for ids, w in batches:
                logits = model(ids)
                lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1).sum(1)
                acc.backward(lp, w)
        results[mode] = flat_grad(trainable(model))
    assert np.linalg.norm(results[None]) > 0
    for mode in (False, True):
        assert rel_err(results[mode], results[None]) <= FLOAT64_RTOL, mode
