"""Every built-in layer rule through the per-rule harness (``proma.testing.check_rule``): Grams and the
accumulated update against per-sequence autograd and ``reference.accumulate``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from proma.testing import check_rule

SIZES = (3, 2, 4)   # sequences per microbatch
TOKENS = 5
WIDTH = 4
VOCAB = 7


def _generic(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, with every parameter perturbed (norm scales start at 1 and biases at 0)."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def _features(seed=0, width=WIDTH, tokens=TOKENS, duplicate=True):
    """One (b, tokens, width) input per microbatch; the second repeats a sequence (rank-deficient Gram)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, tokens, width, generator=gen, dtype=torch.float64) for b in SIZES]
    if duplicate:
        xs[1][1] = xs[1][0]
    return xs


def _ids(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, TOKENS), generator=gen) for b in SIZES]


class TiedEmbedHead(nn.Module):
    """An embedding and an output head sharing one weight (uses by two rules: embedding + linear)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


class Reused(nn.Module):
    """One Linear called twice per forward (two uses of each of its parameters)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def _qwen3_rmsnorm():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return Qwen3RMSNorm(WIDTH)


CASES = [
    pytest.param(lambda: nn.Linear(WIDTH, 3), _features, id="linear"),
    pytest.param(lambda: nn.Linear(WIDTH, 3, bias=False), _features, id="linear-no-bias"),
    pytest.param(lambda: nn.Linear(WIDTH, 3), lambda: [x[:, 0] for x in _features()], id="linear-no-token-dim"),
    pytest.param(lambda: nn.Embedding(VOCAB, WIDTH), _ids, id="embedding"),
    pytest.param(lambda: nn.Embedding(VOCAB, WIDTH, padding_idx=0), _ids, id="embedding-padding-idx"),
    pytest.param(lambda: nn.LayerNorm(WIDTH), _features, id="layernorm"),
    pytest.param(lambda: nn.RMSNorm(WIDTH, eps=1e-5), _features, id="rmsnorm"),
    pytest.param(_qwen3_rmsnorm, _features, id="qwen3-rmsnorm"),
    pytest.param(TiedEmbedHead, _ids, id="tied-embedding-head"),
    pytest.param(Reused, _features, id="reused-linear"),
]


@pytest.mark.parametrize("make_module,make_inputs", CASES)
def test_rule_matches_per_sequence_autograd(make_module, make_inputs):
    errors = check_rule(_generic(make_module()), make_inputs())
    assert errors  # the harness compared something: Grams per microbatch and the accumulated updates


def test_harness_catches_a_wrong_rule():
    """A rule whose bias contribution is twice too large fails the harness on that parameter's Gram."""
    from proma.layers import LinearRule, register, unregister
    from proma.layers.kinds import SeqGrads

    class DoubledBias(LinearRule):
        def contributions(self, module, saved, grad_output, names):
            out = super().contributions(module, saved, grad_output, names)
            if "bias" in out:
                out["bias"] = SeqGrads(2.0 * out["bias"].g)
            return out

    rule = DoubledBias()
    register(rule)
    try:
        with pytest.raises(AssertionError, match="gram module.bias microbatch 0"):
            check_rule(_generic(nn.Linear(WIDTH, 3)), _features())
    finally:
        unregister(rule)


def test_the_shipped_harness_uses_the_named_float64_tolerance():
    """proma.testing cannot import verification; its default tolerance is the named one."""
    from proma.testing import DEFAULT_RTOL
    from verification.tolerances import FLOAT64_RTOL

    assert DEFAULT_RTOL == FLOAT64_RTOL
