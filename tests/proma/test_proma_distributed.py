"""PROMA across processes: two CPU ranks (gloo on 127.0.0.1) against the single-process reference.

One ``mp.spawn`` of two ranks runs every scenario once (spawning costs seconds); each rank writes its
results to a JSON file and the tests below assert on them, one test per property. Rank 0 computes the
oracle for all ranks' microbatches with per-sequence autograd gradients and ``reference.accumulate``.

Convention under test (see ``proma.accumulator``): every mode gives the mean over the W ranks, so
``sync="global"`` equals ``reference.accumulate`` on the union microbatches with weights w / W, and
"local", "intra" and "none" equal the mean of the per-rank single-process results.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from proma import ProjectedAccumulator
from proma.distributed import Packer, merge_pieces, no_sync, pack_contribution, unpack
from proma.layers import IdsFactors, OuterFactors, SeqGrads
from verification.testkit import flat_grad, rel_err, trainable
from verification.tolerances import FLOAT64_RTOL

from proma_testkit import SeqMLP, make_batch, seq_logp, tiny_qwen3
from dist_testkit import (WORLD, expect_error, ok, oracle, oracle_local, qwen_batches, qwen_forward, ref_opts,
                          spawn_scenarios)

VOCAB = 7
# microbatch sizes per rank (uneven, with an empty microbatch on rank 1) and tokens per sequence per rank
SIZES = [[3, 1, 2], [1, 2, 0]]
TOKENS = [5, 7]
ZERO_WEIGHT = (1, 1)  # (rank, microbatch) whose weights are all zero


# -- data, shared by all ranks (every rank builds every rank's batches from one seed) --------------------

def _mlp_batches(seed=0, sizes=SIZES, tokens=TOKENS):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, row in enumerate(sizes):
        mine = []
        for k, b in enumerate(row):
            batch = make_batch(gen, b, tokens[r], VOCAB)
            w = torch.randn(b, generator=gen, dtype=torch.float64)
            if (r, k) == ZERO_WEIGHT:
                w.zero_()
            mine.append((batch, w))
        out.append(mine)
    return out


def _mlp_forward(model, batch):
    ids, targets, mask = batch
    return seq_logp(model(ids), targets, mask.to(torch.float64))


def _mlp(hidden=6):
    torch.manual_seed(0)
    return SeqMLP(vocab=VOCAB, hidden=hidden, norm="rms", tie=True, reuse=True).double()


# -- scenarios (run on every rank) --------------------------------------------------------------------------

def _accumulate(model, forward, mine, wrap=None, **acc_kwargs):
    """Run the accumulator over this rank's microbatches; returns (flat p.grad, comm stats)."""
    net = model if wrap is None else wrap
    with ProjectedAccumulator(net, **acc_kwargs) as acc:
        acc.zero_grad()
        with no_sync(net):
            for batch, w in mine:
                acc.backward(forward(net, batch), w)
        acc.synchronize()
        return flat_grad(trainable(model)), acc.comm_stats()


def _spread(got):
    """max |G_rank - G_0| / ||G_0|| over ranks: the global running gradient must be replicated."""
    mine = torch.from_numpy(got)
    allg = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(allg, mine)
    return max(float((g - allg[0]).abs().max()) for g in allg) / max(float(allg[0].norm()), 1e-300)


def _compare(rank, model, forward, batches, acc_kwargs, want, *, wrap=None):
    got, comm = _accumulate(model, forward, batches[rank], wrap=wrap, **acc_kwargs)
    out = {"spread": _spread(got), "comm": comm}
    if rank == 0:
        out["err"] = rel_err(got, want(model))
        if acc_kwargs.get("sync") == "global":  # how far the other semantics is: the test can tell them apart
            out["local_err"] = rel_err(got, oracle_local(model, forward, batches, ref_opts(acc_kwargs)))
    return out


PROJECTED = {
    "global-exact": dict(variant="proma", sync="global", solver="exact"),
    "global-exact-materialize": dict(variant="proma", sync="global", solver="exact", strategy="materialize"),
    "global-gram-schmidt": dict(variant="proma", sync="global", solver="gram_schmidt", passes=2,
                                relative_bound=0.5, shrinkage=0.7),
    "global-ridge": dict(variant="proma", sync="global", solver="ridge", ridge=0.1),
    "global-exact-excluded": dict(variant="proma", sync="global", solver="exact", exclude=("fc.bias",)),
    "local-exact": dict(variant="proma", sync="local", solver="exact"),
    "none": dict(variant="none"),
    "intra": dict(variant="intra", intra_rank=1),
}


def _scenario_mlp(name):
    kw = PROJECTED[name]

    def run(rank):
        batches = _mlp_batches()
        model = _mlp()
        return _compare(rank, model, _mlp_forward, batches, kw, lambda m: oracle(m, _mlp_forward, batches, kw))
    return run


def _scenario_qwen(rank):
    batches = qwen_batches()
    model = tiny_qwen3(torch.float64)
    kw = PROJECTED["global-exact"]
    out = _compare(rank, model, qwen_forward, batches, kw, lambda m: oracle(m, qwen_forward, batches, kw))
    out["P"] = sum(p.numel() for _, p in trainable(model))
    out["max_b"] = max(max(row) for row in ((2, 1), (1, 2)))
    return out


def _scenario_ddp(variant):
    kw = PROJECTED[variant]

    def run(rank):
        batches = _mlp_batches()
        model = _mlp()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        fwd = lambda net, batch: _mlp_forward(net, batch)  # noqa: E731
        return _compare(rank, model, fwd, batches, kw, lambda m: oracle(m, _mlp_forward, batches, kw), wrap=ddp)
    return run


def _scenario_count_mismatch(rank):
    """Rank 0 runs 2 microbatches, rank 1 only 1 before synchronize: both must raise, neither may hang."""
    batches = _mlp_batches()
    model = _mlp()
    acc = ProjectedAccumulator(model, variant="proma", sync="global")

    def run():
        acc.zero_grad()
        for batch, w in batches[rank][: 2 if rank == 0 else 1]:
            acc.backward(_mlp_forward(model, batch), w)
        acc.synchronize()
    try:
        return expect_error(run)
    finally:
        acc.close()


def _scenario_model_mismatch(sync):
    def run(rank):
        batches = _mlp_batches()
        model = _mlp(hidden=6 if rank == 0 else 8)
        acc = ProjectedAccumulator(model, variant="proma", sync=sync)

        def go():
            acc.zero_grad()
            for batch, w in batches[rank][:2]:
                acc.backward(_mlp_forward(model, batch), w)
            acc.synchronize()
        try:
            return expect_error(go)
        finally:
            acc.close()
    return run


def _scenario_local_error_propagates(rank):
    """A bad input on rank 1 raises there; rank 0 must get a ValueError instead of waiting forever."""
    batches = _mlp_batches()
    model = _mlp()
    acc = ProjectedAccumulator(model, variant="proma", sync="global")

    def go():
        acc.zero_grad()
        batch, w = batches[rank][0]
        acc.backward(_mlp_forward(model, batch), w if rank == 0 else w[:0])
    try:
        return expect_error(go)
    finally:
        acc.close()


SCENARIOS = {name: _scenario_mlp(name) for name in PROJECTED}
SCENARIOS.update({
    "qwen-global-exact": _scenario_qwen,
    "ddp-global-exact": _scenario_ddp("global-exact"),
    "ddp-none": _scenario_ddp("none"),
    "error-count-mismatch": _scenario_count_mismatch,
    "error-model-mismatch-global": _scenario_model_mismatch("global"),
    "error-model-mismatch-local": _scenario_model_mismatch("local"),
    "error-bad-input-one-rank": _scenario_local_error_propagates,
})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_scenarios(__name__, tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("name", list(PROJECTED) + ["qwen-global-exact", "ddp-global-exact", "ddp-none"])
def test_matches_reference_and_ranks_agree(results, name):
    r0, r1 = ok(results, name)
    assert r0["err"] <= FLOAT64_RTOL, f"{name}: relative error {r0['err']:.3g} vs the reference"
    assert r0["spread"] <= FLOAT64_RTOL, f"{name}: ranks hold different gradients ({r0['spread']:.3g})"


@pytest.mark.parametrize("name", ["global-exact", "qwen-global-exact"])
def test_global_differs_from_local(results, name):
    r0, _ = ok(results, name)
    assert r0["local_err"] > 1e-3, f"{name}: union and per-rank projections agree ({r0['local_err']:.3g})"


def test_global_sends_factors_not_per_sequence_model_gradients(results):
    r0, _ = ok(results, "qwen-global-exact")
    comm = r0["comm"]
    # two microbatches; a per-sequence copy of the whole model's gradient would be max_b * P * 8 bytes each
    assert 0 < comm["payload_bytes"] < 2 * r0["max_b"] * r0["P"] * 8
    assert comm["collectives"] == 2 * 2 + 1   # header + buffer per microbatch, header at synchronize


def test_local_sync_costs_one_gradient_allreduce(results):
    r0, _ = ok(results, "local-exact")
    comm = r0["comm"]
    # the header, then one all-reduce of every gradient plus one flag per parameter (all float64)
    n_params = len(trainable(_mlp()))
    assert comm["payload_bytes"] == 8 * 8 + comm["allreduce_payload_bytes"] + 8 * n_params


@pytest.mark.parametrize("name,needle", [
    ("error-count-mismatch", "number of microbatches"),
    ("error-model-mismatch-global", "disagree on the model"),
    ("error-model-mismatch-local", "disagree on the model"),
])
def test_disagreeing_ranks_raise_on_every_rank(results, name, needle):
    for r in range(WORLD):
        got = results[r][name]
        assert got.get("raised") == "ValueError", f"rank {r}: {got}"
        assert needle in got["message"], f"rank {r}: {got['message']}"


def test_bad_input_on_one_rank_stops_every_rank(results):
    r0, r1 = results[0]["error-bad-input-one-rank"], results[1]["error-bad-input-one-rank"]
    assert r1.get("raised") == "ValueError" and "weights must have shape" in r1["message"], r1
    assert r0.get("raised") == "ValueError" and "rank 1 failed" in r0["message"], r0


def test_sync_options_are_validated():
    model = _mlp()
    with pytest.raises(ValueError, match="sync must be one of"):
        ProjectedAccumulator(model, sync="bogus")
    with pytest.raises(ValueError, match="sync='global' is defined for variant='proma'"):
        ProjectedAccumulator(model, variant="intra", sync="global")


def test_empty_microbatch_adds_nothing():
    model = _mlp()
    (batch, w), = _mlp_batches()[0][:1]
    with ProjectedAccumulator(model, sync="global") as acc:
        acc.zero_grad()
        acc.backward(_mlp_forward(model, batch), w)
        before = flat_grad(trainable(model))
        acc.backward(torch.zeros(0), torch.zeros(0))
        np.testing.assert_array_equal(flat_grad(trainable(model)), before)
        assert acc.stats()["summary"]["microbatches"] == 2


def test_single_process_synchronize_is_a_no_op():
    model = _mlp()
    batches = _mlp_batches()
    with ProjectedAccumulator(model, sync="global") as acc:
        acc.zero_grad()
        for batch, w in batches[0]:
            acc.backward(_mlp_forward(model, batch), w)
        before = flat_grad(trainable(model))
        acc.synchronize()
        np.testing.assert_array_equal(flat_grad(trainable(model)), before)
        assert acc.comm_stats()["collectives"] == 0


# -- the wire format alone (no processes) ----------------------------------------------------------------

def _contribution(kind, b, n, o, i, gen, zero_frac):
    """A random contribution of a (o, i) parameter with some all-zero token rows (padding)."""
    if kind == "seq":
        return SeqGrads(torch.randn(b, o, i, generator=gen, dtype=torch.float64))
    B = torch.randn(b, n, i, generator=gen, dtype=torch.float64)
    zero = torch.rand(b, n, generator=gen) < zero_frac
    if kind == "ids":
        B[zero] = 0.0
        return IdsFactors(torch.randint(0, o, (b, n), generator=gen), B, o)
    A = torch.randn(b, n, o, generator=gen, dtype=torch.float64)
    A[zero] = 0.0
    return OuterFactors(A, B, is_linear_weight=True)


def _ship(c, param=0):
    """Pack one rank's contribution, as bytes, and read it back as a Piece."""
    packer = Packer()
    pack_contribution(packer, param, 0, c, torch.float64)
    (_, _, piece), = unpack(packer.finish(torch.device("cpu")), len(packer.meta))
    return piece


@given(kind=st.sampled_from(["factors", "ids", "seq"]), b0=st.integers(0, 3), b1=st.integers(1, 3),
       n0=st.integers(1, 6), n1=st.integers(1, 40), o=st.integers(1, 5), i=st.integers(1, 5),
       zero_frac=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_wire_format_round_trip_gives_the_concatenated_per_sequence_gradients(kind, b0, b1, n0, n1, o, i, zero_frac,
                                                                              seed):
    # n1 up to 40 tokens through a layer of at most 5 x 5 makes the dense route win on one rank only
    gen = torch.Generator().manual_seed(seed)
    cs = [_contribution(kind, b0, n0, o, i, gen, zero_frac), _contribution(kind, b1, n1, o, i, gen, zero_frac)]
    merged = merge_pieces([_ship(c) for c in cs], torch.Size((o, i)), torch.float64, torch.device("cpu"))
    want = torch.cat([c.materialize(0, o, torch.float64) for c in cs])
    assert merged.b == b0 + b1
    torch.testing.assert_close(merged.materialize(0, o, torch.float64), want, rtol=FLOAT64_RTOL, atol=0.0)


def test_shared_inputs_are_sent_once():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)  # 4 tokens x (8 + 16) < 8 x 16: factors win
    packer = Packer()
    for u in range(3):  # q, k, v: one X, three D
        pack_contribution(packer, u, 0, OuterFactors(torch.randn(2, 4, 8, generator=gen, dtype=torch.float64), X),
                          torch.float64)
    # per piece: 2 counts (int32, padded to 8 bytes) and D (2*4*8 float64); X (2*4*16 float64) once
    assert packer.size == 3 * (8 + 2 * 4 * 8 * 8) + 2 * 4 * 16 * 8
