"""ProjectedAccumulator against the reference on real models, with per-sequence gradients from autograd.

The oracle (``proma_testkit.run_with_oracle``) calls autograd once per sequence on the model, outside the
accumulator's hooks (``acc.paused()``), and feeds the flattened gradients to ``reference.accumulate`` with
one block per parameter tensor; intra is checked against ``reference.intra_project`` per microbatch with
X and D read by plain forward hooks and ``retain_grad``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import reference
from proma import ProjectedAccumulator
from verification.tolerances import FLOAT32_RTOL, FLOAT64_RTOL

from verification.testkit import flat_grad, per_sequence_grads, qwen_seq_logp, rel_err, trainable

from proma_testkit import SeqMLP, make_batch, run_with_oracle, seq_logp, tiny_qwen3

RTOL = {torch.float64: FLOAT64_RTOL, torch.float32: FLOAT32_RTOL}


def _weights(gen, b, kind):
    w = torch.randn(b, generator=gen, dtype=torch.float64)
    if kind == "zero":
        w[0] = 0.0
    elif kind == "all_zero":
        w[:] = 0.0
    elif kind == "repeated":
        w[:] = w[0]
    return w


def _mlp_forward(model, batch):
    ids, targets, mask = batch
    return seq_logp(model(ids), targets, mask.to(next(model.parameters()).dtype))


@st.composite
def mlp_cases(draw):
    cfg = dict(norm=draw(st.sampled_from(["layer", "rms", "none"])), bias=draw(st.booleans()),
               tie=draw(st.booleans()), reuse=draw(st.booleans()))
    variant = draw(st.sampled_from(["proma", "proma", "none", "intra"]))
    acc = dict(variant=variant, strategy=draw(st.sampled_from(["auto", "materialize", "ghost"])))
    if variant == "proma":
        acc["solver"] = draw(st.sampled_from(["exact", "gram_schmidt", "ridge", "none"]))
        acc["passes"] = draw(st.integers(1, 3))
        acc["ridge"] = draw(st.sampled_from([1e-3, 0.1]))
        acc["relative_bound"] = draw(st.sampled_from([None, None, 0.0, 0.3]))
        acc["shrinkage"] = draw(st.sampled_from([1.0, 1.0, 0.5]))
    elif variant == "intra":
        acc["intra_rank"] = draw(st.integers(0, 2))
        acc["intra_form"] = draw(st.sampled_from(["two_sided", "kron"]))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    T = draw(st.integers(1, 5))
    dups = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    wkinds = draw(st.lists(st.sampled_from(["random", "zero", "repeated", "all_zero"]), min_size=len(sizes),
                           max_size=len(sizes)))
    return cfg, acc, sizes, T, dups, wkinds, draw(st.integers(0, 2**31 - 1))


@given(case=mlp_cases())
def test_mlp_matches_reference_float64(case):
    cfg, acc_kwargs, sizes, T, dups, wkinds, seed = case
    torch.manual_seed(seed)
    model = SeqMLP(**cfg).double()
    gen = torch.Generator().manual_seed(seed)
    mbs = [(make_batch(gen, b, T, 7, dup=d), _weights(gen, b, k)) for b, d, k in zip(sizes, dups, wkinds)]
    got, want = run_with_oracle(model, mbs, _mlp_forward, acc_kwargs, intra_oracle=acc_kwargs["variant"] == "intra")
    assert rel_err(got, want) <= FLOAT64_RTOL, (rel_err(got, want), acc_kwargs)


@settings(max_examples=10)
@given(case=mlp_cases())
def test_mlp_matches_reference_float32(case):
    cfg, acc_kwargs, sizes, T, dups, wkinds, seed = case
    torch.manual_seed(seed)
    model = SeqMLP(**cfg)
    gen = torch.Generator().manual_seed(seed)
    mbs = [(make_batch(gen, b, T, 7, dup=d), _weights(gen, b, k)) for b, d, k in zip(sizes, dups, wkinds)]
    got, want = run_with_oracle(model, mbs, _mlp_forward, acc_kwargs, intra_oracle=acc_kwargs["variant"] == "intra")
    assert rel_err(got, want) <= FLOAT32_RTOL, (rel_err(got, want), acc_kwargs)


def _qwen_batches(seed, sizes, T=7, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, b in enumerate(sizes):
        ids = torch.randint(0, vocab, (b, T), generator=gen)
        lengths = torch.randint(2, T + 1, (b,), generator=gen)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        if k == 1 and b > 1:  # duplicated sequence: rank-deficient Gram in every block
            ids[1], mask[1] = ids[0], mask[0]
        out.append(((ids, mask), _weights(gen, b, "zero" if k == 2 else "random")))
    return out


def _qwen_forward(model, batch):
    return qwen_seq_logp(model, *batch)


QWEN_CASES = [
    pytest.param(torch.float64, dict(solver="exact"), id="f64-exact"),
    pytest.param(torch.float64, dict(solver="exact", strategy="ghost"), id="f64-exact-ghost"),
    pytest.param(torch.float64, dict(solver="gram_schmidt", passes=2, relative_bound=0.5), id="f64-gs-bound"),
    pytest.param(torch.float64, dict(solver="ridge", ridge=1e-2, shrinkage=0.5), id="f64-ridge-shrink"),
    # "none" is literally (w * seq_logp).sum().backward(): HF's RMSNorm normalises in float32 even in a
    # float64 model, so a w-seeded backward and per-sequence backwards differ at float32 rounding there
    pytest.param(torch.float64, dict(variant="none"), id="f64-none"),
    pytest.param(torch.float64, dict(variant="intra", intra_rank=2, intra_form="kron"), id="f64-intra-kron"),
    pytest.param(torch.float64, dict(variant="intra", intra_rank=1), id="f64-intra-two-sided"),
    pytest.param(torch.float32, dict(solver="exact"), id="f32-exact"),
    pytest.param(torch.float32, dict(solver="gram_schmidt", strategy="ghost"), id="f32-gs-ghost"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,acc_kwargs", QWEN_CASES)
def test_tiny_qwen3_matches_reference(dtype, acc_kwargs):
    model = tiny_qwen3(dtype)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    mbs = _qwen_batches(3, [3, 2, 4, 1])
    got, want = run_with_oracle(model, mbs, _qwen_forward, acc_kwargs, intra_oracle=acc_kwargs.get("variant") == "intra")
    rtol = FLOAT32_RTOL if acc_kwargs.get("variant") == "none" else RTOL[dtype]
    assert rel_err(got, want) <= rtol, rel_err(got, want)


def test_none_variant_is_plain_backward_exactly():
    torch.manual_seed(0)
    model = SeqMLP(tie=True).double()
    ref = SeqMLP(tie=True).double()
    ref.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    mbs = [(make_batch(gen, b, 4, 7), torch.randn(b, generator=gen, dtype=torch.float64)) for b in (2, 3)]
    with ProjectedAccumulator(model, variant="none") as acc:
        acc.zero_grad()
        for batch, w in mbs:
            acc.backward(_mlp_forward(model, batch), w)
    for batch, w in mbs:
        (w * _mlp_forward(ref, batch)).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


class _CountBackward(torch.autograd.Function):
    count = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.count += 1
        return g


class CountedMLP(SeqMLP):
    def forward(self, ids):
        return super().forward(ids) if False else self._fwd(ids)

    def _fwd(self, ids):
        h = _CountBackward.apply(self.norm(self.emb(ids)))
        h = h + self.fc2(torch.tanh(self.fc(h)))
        return self.head(h)


@pytest.mark.parametrize("variant", ["proma", "intra"])
def test_one_forward_one_backward_and_no_parameter_gradients(variant):
    torch.manual_seed(0)
    model = CountedMLP().double()
    forwards, param_grads = [], []
    model.register_forward_hook(lambda *a: forwards.append(1))
    for _, p in model.named_parameters():
        p.register_hook(lambda g: param_grads.append(1))  # fires only if autograd computes a parameter grad
    gen = torch.Generator().manual_seed(0)
    _CountBackward.count = 0
    with ProjectedAccumulator(model, variant=variant) as acc:
        acc.zero_grad()
        for b in (2, 3, 1):
            batch = make_batch(gen, b, 4, 7)
            acc.backward(_mlp_forward(model, batch), torch.randn(b, generator=gen))
    assert len(forwards) == 3
    assert _CountBackward.count == 3
    assert param_grads == []
    assert all(p.grad is not None for p in model.parameters())


def test_close_removes_every_hook_and_leaves_model_unchanged():
    model = tiny_qwen3(torch.float64)
    before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
              for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    acc = ProjectedAccumulator(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) > 0
    batch = _qwen_batches(0, [2])[0]
    acc.backward(_qwen_forward(model, batch[0]), batch[1])
    acc.close()
    acc.close()
    after = {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()}
    assert before == after
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    with pytest.raises(ValueError, match="closed"):
        acc.backward(_qwen_forward(model, batch[0]), batch[1])
    # after close, forwards are plain again: output is not routed through a tap
    out = model(input_ids=batch[0][0]).logits
    assert "Tap" not in type(out.grad_fn).__name__


class RawParamModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.scale = nn.Parameter(torch.ones(3))  # used in a custom forward: no rule
        self.head = nn.Linear(3, 5)

    def forward(self, ids):
        return self.head(self.emb(ids) * self.scale)


def test_unsupported_parameter_raises_or_is_excluded():
    with pytest.raises(ValueError, match="'scale'"):
        ProjectedAccumulator(RawParamModel())
    conv = nn.Sequential(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="0.weight"):
        ProjectedAccumulator(conv)
    ProjectedAccumulator(conv, variant="none").close()  # plain accumulation needs no rule
    with pytest.raises(ValueError, match="exclude"):
        ProjectedAccumulator(RawParamModel(), exclude=["nope"])
    torch.manual_seed(0)
    model = RawParamModel().double()
    gen = torch.Generator().manual_seed(1)
    mbs = []
    for b in (2, 3):
        ids, tg, mask = make_batch(gen, b, 3, 5)
        mbs.append(((ids, tg, mask), torch.randn(b, generator=gen, dtype=torch.float64)))
    got, want_proma = run_with_oracle(model, mbs, _mlp_forward, dict(solver="exact", exclude=["scale"]))
    # oracle: scale gets plain accumulation, the others layer-wise PROMA
    params = trainable(model)
    oracle = []
    for batch, w in mbs:
        oracle.append((per_sequence_grads(model, _mlp_forward(model, batch), params), w.numpy()))
    sizes = [p.numel() for _, p in params]
    exact = reference.accumulate(oracle, blocks=sizes, solver="exact")
    plain = reference.accumulate(oracle, blocks=sizes, solver="none")
    names = [n for n, _ in params]
    k = names.index("scale")
    start = sum(sizes[:k])
    want = exact.copy()
    want[start:start + sizes[k]] = plain[start:start + sizes[k]]
    assert rel_err(got, want) <= FLOAT64_RTOL
    with ProjectedAccumulator(model, exclude=["scale"]) as acc:
        acc.zero_grad()
        acc.backward(_mlp_forward(model, mbs[0][0]), mbs[0][1])
        st_ = acc.stats()
        assert st_["params"]["scale"]["mode"].startswith("plain")
        assert st_["summary"]["excluded"] == 1


def test_frozen_parameters_are_ignored():
    torch.manual_seed(0)
    model = RawParamModel().double()
    model.scale.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    mbs = [(make_batch(gen, b, 3, 5), torch.randn(b, generator=gen, dtype=torch.float64)) for b in (2, 2)]
    got, want = run_with_oracle(model, mbs, _mlp_forward, dict(solver="exact"))
    assert rel_err(got, want) <= FLOAT64_RTOL
    assert model.scale.grad is None and model.head.bias.grad is None


def test_bad_inputs_raise():
    torch.manual_seed(0)
    model = SeqMLP().double()
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(gen, 3, 4, 7)
    with ProjectedAccumulator(model) as acc:
        with pytest.raises(ValueError, match="weights must have shape"):
            acc.backward(_mlp_forward(model, batch), torch.ones(2))
        with pytest.raises(ValueError, match=r"seq_logp must have shape \(b,\)"):
            acc.backward(_mlp_forward(model, batch).reshape(3, 1), torch.ones(3))
        with pytest.raises(ValueError, match="weights contain NaN"):
            acc.backward(_mlp_forward(model, batch), torch.tensor([1.0, float("nan"), 0.0]))
        lp = _mlp_forward(model, batch)
        with pytest.raises(ValueError, match="seq_logp contains NaN"):
            acc.backward(lp * torch.tensor([1.0, float("nan"), 1.0], dtype=lp.dtype), torch.ones(3))
        with pytest.raises(ValueError, match="does not require grad"):
            acc.backward(lp.detach(), torch.ones(3))
        acc._capture.discard()
        with pytest.raises(ValueError, match="no hooked module call"):
            acc.backward(lp, torch.ones(3))
        # activations whose dim 0 is not the sequence dimension
        lp2 = _mlp_forward(model, batch)
        with pytest.raises(ValueError, match="dim 0"):
            acc.backward(lp2.sum().reshape(1), torch.ones(1))
    for bad in (dict(variant="x"), dict(solver="qr"), dict(strategy="x"), dict(passes=0), dict(ridge=0.0),
                dict(relative_bound=-1.0), dict(intra_rank=-1), dict(intra_form="x")):
        with pytest.raises(ValueError, match=list(bad)[0]):
            ProjectedAccumulator(model, **bad)


def test_ghost_equals_materialize_on_qwen3():
    model = tiny_qwen3(torch.float64, seed=2)
    mbs = _qwen_batches(7, [3, 2])
    grads = {}
    for strategy in ("materialize", "ghost"):
        with ProjectedAccumulator(model, strategy=strategy) as acc:
            acc.zero_grad()
            for batch, w in mbs:
                acc.backward(_qwen_forward(model, batch), w)
            strategies = {d["strategy"] for d in acc.stats()["params"].values()}
        grads[strategy] = flat_grad(trainable(model))
        assert strategy in strategies
    assert rel_err(grads["ghost"], grads["materialize"]) <= FLOAT64_RTOL


def test_chunked_materialization_matches():
    model = tiny_qwen3(torch.float64, seed=3)
    mbs = _qwen_batches(8, [3, 3])
    grads = []
    for max_transient in (1 << 24, 50):
        with ProjectedAccumulator(model, strategy="materialize", max_transient=max_transient) as acc:
            acc.zero_grad()
            for batch, w in mbs:
                acc.backward(_qwen_forward(model, batch), w)
        grads.append(flat_grad(trainable(model)))
    assert rel_err(grads[1], grads[0]) <= FLOAT64_RTOL


def test_stats_report_removed_ratio():
    model = tiny_qwen3(torch.float64)
    mbs = _qwen_batches(1, [2, 3])
    with ProjectedAccumulator(model, solver="exact") as acc:
        acc.zero_grad()
        acc.backward(_qwen_forward(model, mbs[0][0]), mbs[0][1])
        first = acc.stats()
        acc.backward(_qwen_forward(model, mbs[1][0]), mbs[1][1])
        second = acc.stats()
    assert first["summary"]["removed_ratio"] == 0.0  # G_0 = 0: nothing to remove
    emb = second["params"]["model.embed_tokens.weight"]
    assert emb["uses"] == 2 and emb["rule"] == "embedding+linear"
    assert 0 < second["summary"]["removed_ratio"]
    for d in second["params"].values():
        assert d["mode"] == "proma" and 1 <= d["gram_rank"] <= 3
        assert d["removed_ratio"] == pytest.approx(d["removed_norm"] / d["incoming_norm"])


def test_bf16_model_accumulates_in_float32_buffer():
    model32 = tiny_qwen3(torch.float32, seed=4)
    model16 = tiny_qwen3(torch.float32, seed=4).to(torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(model32.parameters(), model16.parameters()):
            p.copy_(q.float())  # same (bf16-representable) weights
    mbs = _qwen_batches(9, [2, 2, 2])
    out = {}
    for name, model in (("f32", model32), ("bf16", model16)):
        with ProjectedAccumulator(model, solver="exact") as acc:
            acc.zero_grad()
            for batch, w in mbs:
                acc.backward(_qwen_forward(model, batch), w)
            if name == "bf16":
                assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
                assert all(b.dtype == torch.float32 for b in acc._grads.buffers.values())
        out[name] = flat_grad(trainable(model))
    # bf16 forward/backward differ from float32 at ~1e-2; the accumulation itself is float32
    assert rel_err(out["bf16"], out["f32"]) < 0.1


def test_user_zeroing_grad_restarts_accumulation():
    torch.manual_seed(0)
    model = SeqMLP().double()
    gen = torch.Generator().manual_seed(3)
    b1, b2 = make_batch(gen, 2, 4, 7), make_batch(gen, 3, 4, 7)
    w1, w2 = torch.randn(2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    with ProjectedAccumulator(model) as acc:
        acc.backward(_mlp_forward(model, b1), w1)
        model.zero_grad(set_to_none=True)   # an optimizer's zero_grad also starts a new accumulation
        acc.backward(_mlp_forward(model, b2), w2)
        got = flat_grad(trainable(model))
    model.zero_grad(set_to_none=True)
    (w2 * _mlp_forward(model, b2)).sum().backward()
    assert rel_err(got, flat_grad(trainable(model))) <= FLOAT64_RTOL


# ---- the relative bound, for every solver -------------------------------------------------------------------

# A cap well below the removed components of these microbatches, so that it binds; the check on the uncapped
# result makes sure the comparison exercises the cap, not an untouched R.
BINDING_BOUND = 0.05
# How far (relative) the capped result must lie from the uncapped one for the cap to count as exercised.
BOUND_EFFECT = 1e-3


@pytest.mark.parametrize("solver", ["exact", "gram_schmidt", "ridge"])
@pytest.mark.parametrize("dtype,strategy", [(torch.float64, "materialize"), (torch.float64, "ghost"),
                                            (torch.float32, "auto")], ids=["f64-materialize", "f64-ghost", "f32-auto"])
def test_relative_bound_matches_reference_for_every_solver(solver, dtype, strategy):
    torch.manual_seed(5)
    model = SeqMLP(tie=True, reuse=True).to(dtype)
    gen = torch.Generator().manual_seed(5)
    mbs = [(make_batch(gen, b, 4, 7, dup=b > 2), _weights(gen, b, "random")) for b in (3, 2, 4)]
    acc_kwargs = dict(solver=solver, strategy=strategy, passes=2, ridge=0.1, shrinkage=0.7)
    got, want = run_with_oracle(model, mbs, _mlp_forward, dict(acc_kwargs, relative_bound=BINDING_BOUND))
    _, uncapped = run_with_oracle(model, mbs, _mlp_forward, acc_kwargs)
    assert rel_err(want, uncapped) > BOUND_EFFECT
    assert rel_err(got, want) <= RTOL[dtype], rel_err(got, want)
