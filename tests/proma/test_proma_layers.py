"""Layer rules and blocks: per-sequence gradients from factors, ghost == materialize, the registry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import reference
from proma.layers import Block, IdsFactors, OuterFactors, SeqGrads, find_rule, register, unregister
from proma.layers import tokens as layer_tokens
from proma.layers.norm import NormRule
from verification.tolerances import FLOAT32_RTOL, FLOAT64_ATOL, FLOAT64_RTOL


def _seq_index(b, n):
    return np.repeat(np.arange(b), n)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), n=st.integers(1, 4), o=st.integers(1, 5),
       i=st.integers(1, 5))
def test_outer_and_ids_materialize_match_reference(seed, b, n, o, i):
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(b, n, o, generator=gen, dtype=torch.float64)
    X = torch.randn(b, n, i, generator=gen, dtype=torch.float64)
    seq = _seq_index(b, n)
    got = OuterFactors(D, X).materialize(0, o, torch.float64).numpy()
    want = reference.linear_seq_grads(X.reshape(-1, i).numpy(), D.reshape(-1, o).numpy(), seq, b)
    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=1e-12)
    V = o + 2
    ids = torch.randint(0, V, (b, n), generator=gen)
    got = IdsFactors(ids, X, V).materialize(0, V, torch.float64).numpy()
    want = reference.embedding_seq_grads(ids.reshape(-1).numpy(), X.reshape(-1, i).numpy(), seq, b, V)
    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=1e-12)
    # a row range is the matching slice of the full gradient
    np.testing.assert_allclose(IdsFactors(ids, X, V).materialize(1, V - 1, torch.float64).numpy(), want[:, 1:V - 1],
                               atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), n=st.integers(2 * layer_tokens.TRIM_SAMPLE_STRIDE, 40),
       o=st.integers(1, 5), i=st.integers(1, 5), prompt=st.floats(0.5, 0.9), poisoned=st.booleans())
def test_outer_factors_drop_silent_positions_and_keep_their_sums(seed, b, n, o, i, prompt, poisoned):
    """A prompt (leading positions) and the last position with zero output gradient in every sequence, as a language
    model's head sees them: the products run on the other positions, and agree with the reference on all of them; a
    silent position whose input holds a NaN is kept, so the NaN still reaches the per-sequence gradients."""
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(b, n, o, generator=gen, dtype=torch.float64)
    X = torch.randn(b, n, i, generator=gen, dtype=torch.float64)
    silent = int(prompt * n)
    D[:, :silent] = 0.0
    D[:, -1] = 0.0
    if poisoned:
        X[b - 1, 1, i - 1] = float("nan")
    G = torch.randn(o, i, generator=gen, dtype=torch.float64)
    a = torch.randn(b, generator=gen, dtype=torch.float64)
    u = OuterFactors(D, X)
    kept, _ = u.active()
    assert kept.shape[1] == n - silent - 1 + int(poisoned)
    clean = torch.nan_to_num(X)   # the reference refuses NaN; a silent position's input does not matter to it
    want = reference.linear_seq_grads(clean.reshape(-1, i).numpy(), D.reshape(-1, o).numpy(), _seq_index(b, n), b)
    flat = want.reshape(b, -1)
    got, h, out = u.materialize(0, o, torch.float64).numpy(), u.inner(G, torch.float64).numpy(), G.clone()
    u.add_weighted_(out, a)
    if poisoned:   # 0 * NaN: the last sequence's column i - 1, its inner product, the update's column i - 1
        assert np.isnan(got[b - 1, :, i - 1]).all() and np.isnan(h[b - 1]) and out[:, i - 1].isnan().all()
        got[b - 1, :, i - 1], h[b - 1] = want[b - 1, :, i - 1], (flat @ G.reshape(-1).numpy())[b - 1]
        out[:, i - 1] = G[:, i - 1] + torch.from_numpy(a.numpy() @ flat).reshape(o, i)[:, i - 1]
    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    np.testing.assert_allclose(h, flat @ G.reshape(-1).numpy(), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    np.testing.assert_allclose(out.numpy(), G.numpy() + (a.numpy() @ flat).reshape(o, i), rtol=FLOAT64_RTOL,
                               atol=FLOAT64_ATOL)


def test_outer_factors_keep_every_position_when_few_are_silent():
    """Only the last position silent (every other layer of a language model): no copy of the factors."""
    D, X = torch.randn(2, 16, 3, dtype=torch.float64), torch.randn(2, 16, 4, dtype=torch.float64)
    D[:, -1] = 0.0
    kept_D, kept_X = OuterFactors(D, X).active()
    assert kept_D is D and kept_X is X


@st.composite
def factor_sets(draw):
    """Uses of one (o, i) parameter: 1-3 dense and/or ids factor pairs with their own token counts."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    b, o, i = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    kinds = draw(st.lists(st.sampled_from(["dense", "ids"]), min_size=1, max_size=3))
    uses = []
    for kind in kinds:
        n = draw(st.integers(1, 4))
        B = torch.randn(b, n, i, generator=gen, dtype=torch.float64)
        if kind == "dense":
            A = torch.randn(b, n, o, generator=gen, dtype=torch.float64)
            A[:, -1] *= draw(st.sampled_from([0.0, 1.0]))  # padded tokens: zero output gradient
            uses.append(OuterFactors(A, B))
        else:
            uses.append(IdsFactors(torch.randint(0, o, (b, n), generator=gen), B, o))
    return uses, torch.randn(o, i, generator=gen, dtype=torch.float64), torch.randn(b, generator=gen, dtype=torch.float64)


def _dense_seq_grads(uses):
    return sum(u.materialize(0, u.shape[0], torch.float64) for u in uses).reshape(uses[0].b, -1)


@given(problem=factor_sets(), max_transient=st.sampled_from([1, 7, 1 << 20]))
def test_block_strategies_agree_with_dense(problem, max_transient):
    uses, G, a = problem
    g = _dense_seq_grads(uses)
    K, h, upd = g @ g.T, g @ G.reshape(-1), (a @ g).reshape(G.shape)
    scale = float(g.norm() ** 2 + g.norm() * G.norm()) + 1e-30
    for strategy in ("materialize", "ghost"):
        blk = Block(uses, strategy=strategy, work_dtype=torch.float64, max_transient=max_transient)
        Kb, hb = blk.gram_and_inner(G)
        out = G.clone()
        blk.add_weighted_(out, a)
        assert blk.strategy == strategy or blk.ids_only
        assert float((Kb - K).abs().max()) <= FLOAT64_RTOL * scale
        assert float((hb - h).abs().max()) <= FLOAT64_RTOL * scale
        assert float((out - G - upd).abs().max()) <= FLOAT64_RTOL * scale
        fresh = Block(uses, strategy=strategy, work_dtype=torch.float64, max_transient=max_transient)
        assert float((fresh.gram() - K).abs().max()) <= FLOAT64_RTOL * scale
        assert float((fresh.inner(G) - h).abs().max()) <= FLOAT64_RTOL * scale


# ---- float32 blocks against float64 Grams of the same factors ---------------------------------------------

# Relative distances of the near-copies from sequence 0 (0: an exact copy): the Gram's eigenvalues then reach
# down to ~1e-12 of its largest, far below float32's eps (a float32 Gram resolves only sqrt(eps32) in
# singular values), but a float32 model's per-sequence gradients still determine them (to ~eps32).
NEAR_COPY_DELTAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
FLOAT32_STRATEGIES = {"materialize": 1 << 20, "chunked materialize": 1, "ghost": 1 << 20}  # -> max_transient


@st.composite
def ill_conditioned_factor_sets(draw):
    """Float32 uses of one (o, i) parameter whose b sequences are sequence 0 plus near-copies of it.

    Returns (uses in float32, the same factors in float64, G, a): every float64 factor is exactly the float32 one.
    """
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, o, i = draw(st.integers(2, 4)), draw(st.integers(2, 6)), draw(st.integers(1, 5))
    deltas = torch.tensor([0.0, *draw(st.lists(st.sampled_from(NEAR_COPY_DELTAS), min_size=b - 1, max_size=b - 1))],
                          dtype=torch.float64)

    def near_copies(n, width):
        base = torch.randn(1, n, width, generator=gen, dtype=torch.float64)
        return (base + deltas[:, None, None] * torch.randn(b, n, width, generator=gen, dtype=torch.float64)).float()

    uses32, uses64 = [], []
    for kind in draw(st.lists(st.sampled_from(["dense", "ids"]), min_size=1, max_size=3)):
        n = draw(st.integers(1, 4))
        B = near_copies(n, i)
        if kind == "dense":
            A = near_copies(n, o)
            uses32.append(OuterFactors(A, B))
            uses64.append(OuterFactors(A.double(), B.double()))
        else:
            ids = torch.randint(0, o, (1, n), generator=gen).expand(b, n).contiguous()
            uses32.append(IdsFactors(ids, B, o))
            uses64.append(IdsFactors(ids, B.double(), o))
    G = torch.randn(o, i, generator=gen).float()
    a = torch.randn(b, generator=gen).float()
    return uses32, uses64, G, a


def _singular_values(K):
    """Singular values of the per-sequence gradients implied by their Gram K, in decreasing order."""
    return torch.linalg.eigvalsh(K.double()).clamp(min=0).sqrt().flip(0)


@given(problem=ill_conditioned_factor_sets(), strategy=st.sampled_from(sorted(FLOAT32_STRATEGIES)))
def test_float32_block_resolves_what_the_float64_gram_of_its_factors_resolves(problem, strategy):
    """A float32 block's Gram gives the singular values of the float64 Gram of the same factors to float32
    precision of the largest (a float32 Gram would give only sqrt(eps32)); the ghost Gram, formed from the
    factors in float64, equals it to float64 rounding; inner products and the update to float32 precision."""
    uses32, uses64, G, a = problem
    g = _dense_seq_grads(uses64)
    K, h, upd = g @ g.T, g @ G.double().reshape(-1), (a.double() @ g).reshape(G.shape)
    scale = float(g.norm() ** 2 + g.norm() * G.norm())
    blk = Block(uses32, strategy=strategy.split()[-1], work_dtype=torch.float32,
                max_transient=FLOAT32_STRATEGIES[strategy])
    assert blk.strategy == strategy.split()[-1]
    Kb, hb = blk.gram_and_inner(G)
    out = G.clone()
    blk.add_weighted_(out, a)
    sv = _singular_values(K)
    assert float((_singular_values(Kb) - sv).abs().max()) <= FLOAT32_RTOL * float(sv[0])
    if blk.strategy == "ghost":
        assert float((Kb - K).abs().max()) <= FLOAT64_RTOL * scale
    assert float((hb.double() - h).abs().max()) <= FLOAT32_RTOL * scale
    assert float((out.double() - G.double() - upd).abs().max()) <= FLOAT32_RTOL * scale

def test_cost_model_prefers_ghost_for_few_tokens_and_materialize_for_many():
    few = OuterFactors(torch.randn(2, 1, 512), torch.randn(2, 1, 512))
    many = OuterFactors(torch.randn(8, 256, 64), torch.randn(8, 256, 64))
    assert Block([few], work_dtype=torch.float32).strategy == "ghost"
    assert Block([many], work_dtype=torch.float32).strategy == "materialize"


def test_seq_grads_block():
    g = torch.randn(3, 4, dtype=torch.float64)
    blk = Block([SeqGrads(g), SeqGrads(2 * g)], strategy="ghost", work_dtype=torch.float64)
    assert blk.strategy == "materialize"  # vector contributions are always materialised
    torch.testing.assert_close(blk.gram(), 9 * g @ g.T)


def test_block_rejects_mismatched_uses():
    with pytest.raises(ValueError, match="disagree"):
        Block([SeqGrads(torch.zeros(2, 3)), SeqGrads(torch.zeros(3, 3))], work_dtype=torch.float32)


class GemmaLikeRMSNorm(nn.Module):
    """Looks like an RMSNorm by name, but scales by (1 + weight): the norm rule must refuse it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_registry_matches_by_structure():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    assert find_rule(nn.Linear(2, 3)).name == "linear"
    assert find_rule(nn.Embedding(4, 2)).name == "embedding"
    assert find_rule(nn.Embedding(4, 2, max_norm=1.0)) is None
    assert find_rule(nn.LayerNorm(3)).name == "norm"
    assert find_rule(nn.RMSNorm(3)).name == "norm"
    assert find_rule(Qwen3RMSNorm(3)).name == "norm"
    assert find_rule(nn.Conv1d(2, 2, 3)) is None
    assert find_rule(GemmaLikeRMSNorm(3)).name == "norm"  # by name; validation rejects it at first call


def test_norm_validation_rejects_other_forms():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for module in (nn.LayerNorm(4).double(), nn.RMSNorm(4).double(), Qwen3RMSNorm(4).double()):
        with torch.no_grad():
            module.weight.normal_()
        NormRule().validate(module, (x,), module(x))
    bad = GemmaLikeRMSNorm(4).double()
    with torch.no_grad():
        bad.weight.normal_()
    with pytest.raises(ValueError, match="does not compute"):
        NormRule().validate(bad, (x,), bad(x))


def test_norm_contributions_match_reference():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    b, n, f = 3, 4, 5
    x = torch.randn(b, n, f, dtype=torch.float64)
    D = torch.randn(b, n, f, dtype=torch.float64)
    for module in (nn.LayerNorm(f).double(), Qwen3RMSNorm(f).double()):
        names = NormRule().param_names(module)
        out = NormRule().contributions(module, x, D, names)
        xhat = NormRule.normalized(module, x)
        want = reference.scale_seq_grads(xhat.reshape(-1, f).numpy(), D.reshape(-1, f).numpy(), _seq_index(b, n), b)
        np.testing.assert_allclose(out["weight"].g.numpy(), want, rtol=FLOAT64_RTOL, atol=1e-12)
        if "bias" in names:
            np.testing.assert_allclose(out["bias"].g.numpy(), D.sum(1).numpy(), rtol=FLOAT64_RTOL)


def test_user_rule_takes_precedence():
    class ScaleRule:
        name = "scale"

        def matches(self, module):
            return isinstance(module, nn.Linear)

        def param_names(self, module):
            return ("weight",)

        def save(self, module, args, output):
            return args[0]

        def contributions(self, module, saved, grad_output, names):
            return {}

    rule = ScaleRule()
    register(rule)
    try:
        assert find_rule(nn.Linear(2, 2)) is rule
    finally:
        unregister(rule)
    assert find_rule(nn.Linear(2, 2)).name == "linear"
    with pytest.raises(ValueError, match="must define"):
        register(object())
