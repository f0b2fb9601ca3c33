"""Models, microbatches and the independent oracle shared by the proma tests.

The oracle never uses the accumulator's hooks: per-sequence gradients come from one autograd call per
sequence on the model itself (``torch.autograd.grad(seq_logp[i], params)``), flattened per parameter and
fed to ``reference.accumulate`` with one block per parameter tensor (:func:`run_with_oracle`); intra is
checked against ``reference.intra_project`` per microbatch (:func:`intra_microbatch_oracle`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import reference
from proma import ProjectedAccumulator
from verification import testkit
from verification.testkit import GENERIC_PERTURBATION, flat_grad, per_sequence_grads, trainable

# rcond (relative singular-value cutoff) of the oracle for a float32 model (see run_with_oracle)
ORACLE_RCOND_F32 = 1e-5


class SeqMLP(nn.Module):
    """Sequence model: embedding -> [norm] -> Linear -> tanh -> (tied) Linear scores per token.

    ``seq_logp`` = sum over unpadded positions of log-softmax(scores)[target].
    """

    def __init__(self, vocab=7, width=5, hidden=6, *, bias=True, norm="layer", tie=False, reuse=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        if norm == "layer":
            self.norm = nn.LayerNorm(width)
        elif norm == "rms":
            self.norm = nn.RMSNorm(width, eps=1e-5)
        else:
            self.norm = nn.Identity()
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.reuse = reuse

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = h + self.fc2(torch.tanh(self.fc(h)))
        if self.reuse:  # the same module called twice per forward
            h = h + self.fc2(torch.tanh(self.fc(h)))
        return self.head(h)


def seq_logp(logits, targets, mask):
    """Total log-probability of each sequence's unmasked targets, (b,)."""
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(dim=1)


def make_batch(gen, b, T, vocab, *, pad=True, dup=False):
    """ids, targets (b, T) and a mask with ragged lengths (>= 1 token each)."""
    ids = torch.randint(0, vocab, (b, T), generator=gen)
    targets = torch.randint(0, vocab, (b, T), generator=gen)
    lengths = torch.randint(1, T + 1, (b,), generator=gen) if pad else torch.full((b,), T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    if dup and b > 1:  # sequence 1 duplicates sequence 0: rank-deficient Gram
        ids[1], targets[1], mask[1] = ids[0], targets[0], mask[0]
    return ids, targets, mask


def tiny_qwen3(dtype=torch.float64, seed=0, vocab=50, tie=True):
    """The tests' generic tiny Qwen3 (``verification.testkit.tiny_qwen3`` with every weight perturbed)."""
    return testkit.tiny_qwen3(dtype, seed, vocab_size=vocab, tie=tie, perturb=GENERIC_PERTURBATION)


def run_with_oracle(model, microbatches, forward, acc_kwargs, *, intra_oracle=False):
    """Accumulate ``microbatches`` [(batch, w)] with ``ProjectedAccumulator(model, **acc_kwargs)``; return
    (its p.grad flat, the oracle's flat gradient).

    The oracle's per-sequence gradients are taken inside ``acc.paused()`` (one autograd call per sequence) and
    fed to ``reference.accumulate`` with one block per parameter tensor; for ``variant="intra"`` (with
    ``intra_oracle=True``) to :func:`intra_microbatch_oracle` per microbatch instead.
    """
    params = trainable(model)
    acc = ProjectedAccumulator(model, **acc_kwargs)
    oracle, intra_total = [], None
    try:
        acc.zero_grad()
        for batch, w in microbatches:
            with acc.paused():
                lp = forward(model, batch)
                seq = per_sequence_grads(model, lp, params)
                oracle.append((seq, w.numpy()))
                if intra_oracle:
                    part = intra_microbatch_oracle(model, forward, batch, params, seq, w.numpy(), acc_kwargs)
                    intra_total = part if intra_total is None else intra_total + part
            acc.backward(forward(model, batch), w)
        got = flat_grad(params)
    finally:
        acc.close()
    variant = acc_kwargs.get("variant", "proma")
    if variant == "intra":
        return got, intra_total
    opts = {k: acc_kwargs[k] for k in ("passes", "ridge", "relative_bound", "shrinkage") if k in acc_kwargs}
    solver = acc_kwargs.get("solver", "exact") if variant == "proma" else "none"
    # float32 per-sequence gradients carry ~1e-7 relative rounding (two copies of one sequence differ by
    # that much), so their span is only defined above it: the oracle gets a float32-level rcond
    rcond = None if params[0][1].dtype == torch.float64 else ORACLE_RCOND_F32
    want = reference.accumulate(oracle, blocks=[p.numel() for _, p in params], solver=solver, rcond=rcond, **opts)
    return got, want


def intra_microbatch_oracle(model, forward, batch, params, seq, w, acc_kwargs):
    """One microbatch of intra: reference.intra_project on every Linear weight whose uses are all Linear."""
    records = {}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    other_uses = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def hook(module, args, output):
        output.retain_grad()
        records.setdefault(id(module.weight), []).append((args[0], output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        lp = forward(model, batch)
        lp.sum().backward(inputs=[r[1] for rs in records.values() for r in rs])
    finally:
        for h in handles:
            h.remove()
    pg = w @ seq
    out, start = [], 0
    for _, p in params:
        blk = pg[start:start + p.numel()]
        start += p.numel()
        if id(p) in linear_weights and id(p) not in other_uses and id(p) in records:
            X = np.concatenate([x.detach().reshape(-1, x.shape[-1]).double().numpy() for x, _ in records[id(p)]])
            D = np.concatenate([o.grad.reshape(-1, o.shape[-1]).double().numpy() for _, o in records[id(p)]])
            keep = np.any(D != 0, axis=1)
            blk = reference.intra_project(blk.reshape(p.shape), X[keep], D[keep], rank=acc_kwargs.get("intra_rank", 1),
                                          form=acc_kwargs.get("intra_form", "two_sided")).reshape(-1)
        out.append(blk)
    return np.concatenate(out)
