"""The public capture utility: every hooked call's factors from one forward and one backward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reference
from proma import capture_factors
from verification.testkit import per_sequence_grads, trainable
from verification.tolerances import FLOAT64_RTOL

from proma_testkit import SeqMLP, make_batch, seq_logp


def test_capture_factors_give_linear_per_sequence_grads():
    torch.manual_seed(0)
    model = SeqMLP(norm="rms", reuse=True).double()
    gen = torch.Generator().manual_seed(0)
    ids, tg, mask = make_batch(gen, 3, 5, 7)
    calls = capture_factors(model, lambda: seq_logp(model(ids), tg, mask))
    assert [c.name for c in calls] == ["emb", "norm", "fc", "fc2", "fc", "fc2", "head"]
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    # per-sequence grads of fc.weight from the two captured calls == autograd per sequence
    fc_calls = [c for c in calls if c.name == "fc"]
    got = 0
    for c in fc_calls:
        X, D, seq = c.tokens()
        got = got + reference.linear_seq_grads(X.numpy(), D.numpy(), seq.numpy(), 3)
    params = trainable(model)
    rows = per_sequence_grads(model, seq_logp(model(ids), tg, mask), params)
    names = [n for n, _ in params]
    k = names.index("fc.weight")
    start = sum(p.numel() for _, p in params[:k])
    want = rows[:, start:start + model.fc.weight.numel()].reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=1e-13)
    emb = calls[0]
    ids_flat, D, seq = emb.tokens()
    assert ids_flat.shape == (15,) and D.shape == (15, 5) and seq.tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_capture_factors_rejects_non_vector_output():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="1-D"):
        capture_factors(model, lambda: model(torch.randn(3, 2)).sum())
    assert len(model[0]._forward_hooks) == 0
