"""Data and oracles of the multi-process tests: every rank builds every rank's microbatches from one seed, and
rank 0 computes the expected gradient from per-sequence autograd gradients and ``reference.accumulate``.

Convention under test (see ``proma.accumulator``): every mode gives the mean over the W ranks, so
``sync="global"`` equals ``reference.accumulate`` on the union microbatches with weights w / W, and "local",
"intra" and "none" equal the mean of the per-rank single-process results.

(The same oracles as ``test_proma_distributed.py``'s private helpers, for the Qwen3 workload.)
"""
from __future__ import annotations

import numpy as np
import torch

import reference
from verification.testkit import per_sequence_grads, qwen_seq_logp, trainable

from proma_testkit import intra_microbatch_oracle

WORLD = 2


def qwen_batches(seed=1, sizes=((2, 1), (1, 2)), tokens=(6, 8), vocab=50):
    """[rank][k] = ((ids, mask), w): ragged right-padded sequences, float64 weights."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, row in enumerate(sizes):
        mine = []
        for b in row:
            ids = torch.randint(0, vocab, (b, tokens[r]), generator=gen)
            lengths = torch.randint(2, tokens[r] + 1, (b,), generator=gen)
            mask = (torch.arange(tokens[r])[None, :] < lengths[:, None]).long()
            mine.append(((ids, mask), torch.randn(b, generator=gen, dtype=torch.float64)))
        out.append(mine)
    return out


def qwen_forward(model, batch):
    return qwen_seq_logp(model, *batch)


def ref_opts(acc_kwargs):
    """``reference.accumulate`` options of accumulator keywords (solver "none" for variants other than proma)."""
    opts = {k: acc_kwargs[k] for k in ("passes", "ridge", "relative_bound", "shrinkage") if k in acc_kwargs}
    opts["solver"] = acc_kwargs.get("solver", "exact") if acc_kwargs.get("variant", "proma") == "proma" else "none"
    return opts


def oracle_global(model, forward, batches, opts):
    """reference.accumulate on the union of every rank's k-th microbatch, weights / W."""
    params = trainable(model)
    mbs = []
    for k in range(len(batches[0])):
        rows = [(per_sequence_grads(model, forward(model, batches[r][k][0]), params), batches[r][k][1].numpy())
                for r in range(WORLD) if batches[r][k][1].numel()]
        mbs.append((np.vstack([g for g, _ in rows]), np.concatenate([w for _, w in rows]) / WORLD))
    return reference.accumulate(mbs, blocks=[p.numel() for _, p in params], **opts)


def oracle_local(model, forward, batches, opts):
    """Mean over ranks of reference.accumulate on each rank's own microbatches."""
    params = trainable(model)
    total = 0.0
    for r in range(WORLD):
        mbs = [(per_sequence_grads(model, forward(model, batch), params), w.numpy()) for batch, w in batches[r]
               if w.numel()]
        total = total + reference.accumulate(mbs, blocks=[p.numel() for _, p in params], **opts)
    return total / WORLD


def oracle_intra(model, forward, batches, acc_kwargs):
    """Mean over ranks of single-process intra: reference.intra_project per microbatch and Linear weight."""
    params = trainable(model)
    total = 0.0
    for r in range(WORLD):
        for batch, w in batches[r]:
            if w.numel():
                seq = per_sequence_grads(model, forward(model, batch), params)
                total = total + intra_microbatch_oracle(model, forward, batch, params, seq, w.numpy(), acc_kwargs)
    return total / WORLD
