"""PROMA on a model sharded with FSDP2 (``fully_shard`` on every decoder layer and the root): two CPU ranks (gloo).

One ``mp.spawn`` runs every scenario (spawning costs seconds); each rank writes JSON and the tests assert on it.
Every rank builds the same float64 tiny Qwen3 twice: one copy is sharded and accumulated, the other stays whole
for rank 0's oracle (per-sequence autograd gradients and ``reference.accumulate``, :mod:`dist_testkit`). After
``synchronize()`` each ``p.grad`` must be a ``DTensor`` sharded like ``p``; its ``full_tensor()`` is compared with
the oracle.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from proma import ProjectedAccumulator
from verification.testkit import rel_err, trainable
from verification.tolerances import FLOAT32_RTOL, FLOAT64_RTOL

from proma_testkit import ORACLE_RCOND_F32, tiny_qwen3
from dist_testkit import (WORLD, expect_error, ok, oracle, oracle_global, oracle_local, qwen_batches, qwen_forward,
                          ref_opts, spawn_scenarios)

pytestmark = pytest.mark.distributed

# bf16 forward vs the float32 reference: bf16 rounds activations and weights to 8 bits of mantissa (~4e-3)
BF16_RTOL = 5e-2
LR = 0.1
# an odd vocabulary: the (tied) embedding's 51 rows shard unevenly (26 + 25), as FSDP2's torch.chunk layout does
VOCAB = 51


def _model(dtype):
    return tiny_qwen3(dtype, vocab=VOCAB)


SCENARIOS_PROMA = {
    "local-exact": dict(variant="proma", sync="local", solver="exact"),
    "local-gram-schmidt": dict(variant="proma", sync="local", solver="gram_schmidt", passes=2, relative_bound=0.5),
    "local-ridge": dict(variant="proma", sync="local", solver="ridge", ridge=0.1),
    "local-solver-none": dict(variant="proma", sync="local", solver="none"),
    "global-exact": dict(variant="proma", sync="global", solver="exact"),
    "global-gram-schmidt": dict(variant="proma", sync="global", solver="gram_schmidt", passes=2,
                                relative_bound=0.5, shrinkage=0.7),
    "global-ridge": dict(variant="proma", sync="global", solver="ridge", ridge=0.1),
    "global-exact-materialize": dict(variant="proma", sync="global", solver="exact", strategy="materialize"),
    "none": dict(variant="none"),
    "intra": dict(variant="intra", intra_rank=1),
}
EXCLUDED = "model.norm.weight"
SCENARIOS_PROMA["global-exact-excluded"] = dict(variant="proma", sync="global", solver="exact", exclude=(EXCLUDED,))


def _shard(model, mp_policy=None, mesh=None):
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    if mesh is not None:
        kw["mesh"] = mesh
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _accumulate(net, mine, *, step=False, **acc_kwargs):
    """Accumulate this rank's microbatches on the sharded ``net``; returns facts about p.grad and its full value."""
    from torch.distributed.tensor import DTensor

    opt = torch.optim.SGD(net.parameters(), lr=LR)
    before = [p.full_tensor().detach().clone() for p in net.parameters()] if step else None
    with ProjectedAccumulator(net, **acc_kwargs) as acc:
        acc.zero_grad()
        for batch, w in mine:
            acc.backward(qwen_forward(net, batch), w)
        acc.synchronize()
        comm = acc.comm_stats()
    params = [p for _, p in trainable(net)]
    facts = {"dtensor": all(isinstance(p.grad, DTensor) for p in params),
             "placed_like_param": all(p.grad.placements == p.placements and p.grad.to_local().shape ==
                                      p.to_local().shape for p in params),
             "grad_dtype": sorted({str(p.grad.dtype) for p in params}), "comm": comm}
    flat = np.concatenate([p.grad.full_tensor().double().reshape(-1).numpy() for p in params])
    if step:
        opt.step()
        delta = np.concatenate([(p.full_tensor().detach() - b).double().reshape(-1).numpy()
                                for p, b in zip(net.parameters(), before)])
        facts["step_err"] = rel_err(delta, -LR * flat)
    return flat, facts


def _scenario(name):
    kw = SCENARIOS_PROMA[name]

    def run(rank):
        batches = qwen_batches()
        net = _shard(_model(torch.float64))
        got, facts = _accumulate(net, batches[rank], step=name == "global-exact", **kw)
        if rank == 0:
            facts["err"] = rel_err(got, oracle(_model(torch.float64), qwen_forward, batches, kw))
            if kw.get("sync") == "global":   # the other semantics must be told apart
                facts["local_err"] = rel_err(got, oracle_local(_model(torch.float64), qwen_forward, batches,
                                                                ref_opts(kw)))
        return facts
    return run


# reference options of the float32 oracle: the exact solver with the float32 model's rank cut-off
F32_REF_OPTS = {"solver": "exact", "rcond": ORACLE_RCOND_F32}


def _scenario_mixed(param_dtype):
    def run(rank):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        batches = qwen_batches()
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        net = _shard(_model(torch.float32), mp_policy=policy)
        got, facts = _accumulate(net, batches[rank], variant="proma", sync="global", solver="exact")
        if rank == 0:
            facts["err"] = rel_err(got, oracle_global(_model(torch.float32), qwen_forward, batches, F32_REF_OPTS))
            facts["finite"] = bool(np.isfinite(got).all())
        return facts
    return run


def _scenario_hsdp(rank):
    from torch.distributed.device_mesh import init_device_mesh

    net = _shard(_model(torch.float64), mesh=init_device_mesh("cpu", (WORLD, 1),
                                                                   mesh_dim_names=("replicate", "shard")))
    return expect_error(lambda: ProjectedAccumulator(net, variant="proma"))


def _scenario_tensor_parallel(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    net = torch.nn.Sequential(torch.nn.Linear(4, 6))
    parallelize_module(net, init_device_mesh("cpu", (WORLD,)), {"0": ColwiseParallel()})
    return expect_error(lambda: ProjectedAccumulator(net, variant="proma"))


def _scenario_backward_after_synchronize(rank):
    batches = qwen_batches()
    net = _shard(_model(torch.float64))
    acc = ProjectedAccumulator(net, variant="proma", sync="local")

    def go():
        acc.zero_grad()
        batch, w = batches[rank][0]
        acc.backward(qwen_forward(net, batch), w)
        acc.synchronize()
        acc.backward(qwen_forward(net, batch), w)
    try:
        return expect_error(go)
    finally:
        acc.close()


def _scenario_built_before_sharding(rank):
    model = _model(torch.float64)
    acc = ProjectedAccumulator(model, variant="proma")
    _shard(model)   # replaces every parameter by a DTensor: the accumulator's would be stale
    try:
        return expect_error(acc.zero_grad)
    finally:
        acc.close()


# parameter elements per exchange round small enough that the tiny model's global microbatch takes several rounds
SMALL_ROUND = 2000


def _scenario_rounds(rank):
    import proma.distributed as pd

    saved, pd.EXCHANGE_ROUND_ELEMENTS = pd.EXCHANGE_ROUND_ELEMENTS, SMALL_ROUND
    try:
        facts = _scenario("global-exact")(rank)
        facts["rounds"] = len(pd.exchange_rounds([(n, p, []) for n, p in trainable(_model(torch.float64))]))
    finally:
        pd.EXCHANGE_ROUND_ELEMENTS = saved
    return facts


SCENARIOS = {name: _scenario(name) for name in SCENARIOS_PROMA}
SCENARIOS.update({
    "global-exact-rounds": _scenario_rounds,
    "mixed-float32": _scenario_mixed(torch.float32),
    "mixed-bfloat16": _scenario_mixed(torch.bfloat16),
    "error-hsdp": _scenario_hsdp,
    "error-tensor-parallel": _scenario_tensor_parallel,
    "error-backward-after-synchronize": _scenario_backward_after_synchronize,
    "error-built-before-sharding": _scenario_built_before_sharding,
})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_scenarios(__name__, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("name", list(SCENARIOS_PROMA))
def test_sharded_grads_match_reference(results, name):
    r0, r1 = ok(results, name)
    for r in (r0, r1):
        assert r["dtensor"] and r["placed_like_param"], f"{name}: p.grad is not sharded like its parameter"
    assert r0["err"] <= FLOAT64_RTOL, f"{name}: relative error {r0['err']:.3g} vs the reference"


@pytest.mark.parametrize("name", ["global-exact", "global-gram-schmidt"])
def test_global_differs_from_local(results, name):
    r0, _ = ok(results, name)
    assert r0["local_err"] > 1e-3, f"{name}: union and per-rank projections agree ({r0['local_err']:.3g})"


def test_global_exchange_in_rounds_matches_reference(results):
    r0, r1 = ok(results, "global-exact-rounds")
    assert r0["dtensor"] and r1["dtensor"]
    assert r0["err"] <= FLOAT64_RTOL, f"relative error {r0['err']:.3g} vs the reference"
    # two microbatches, a header and a buffer per round, the header at synchronize
    assert r0["comm"]["collectives"] == 2 * 2 * r0["rounds"] + 1 and r0["rounds"] > 2, r0


def test_optimizer_steps_on_sharded_grads(results):
    r0, _ = ok(results, "global-exact")
    assert r0["step_err"] <= FLOAT64_RTOL, f"SGD step is not -lr * grad ({r0['step_err']:.3g})"


def test_local_sync_costs_one_reduce_scatter(results):
    r0, _ = ok(results, "local-exact")
    comm = r0["comm"]
    n_params = comm["allreduce_payload_bytes"]   # every gradient once, float64
    # header all-gather, flag all-reduce, reduce-scatter of the gradients (zero-padded to W equal shards)
    assert comm["collectives"] == 3
    assert n_params <= comm["payload_bytes"] - 8 * 8 - 8 * len(trainable(_model(torch.float64))) < 1.01 * n_params


def test_global_sync_sends_no_gradient(results):
    r0, _ = ok(results, "global-exact")
    assert r0["comm"]["collectives"] == 2 * 2 + 1   # header + buffer per microbatch, header at synchronize


def test_mixed_precision_float32_forward_matches_float32_reference(results):
    r0, r1 = ok(results, "mixed-float32")
    assert r0["dtensor"] and r1["dtensor"] and r0["grad_dtype"] == ["torch.float32"]
    assert r0["err"] <= FLOAT32_RTOL, f"relative error {r0['err']:.3g}"


def test_mixed_precision_bfloat16_runs(results):
    r0, _ = ok(results, "mixed-bfloat16")
    assert r0["dtensor"] and r0["finite"] and r0["grad_dtype"] == ["torch.float32"]
    # bf16 forward: the float32 reference is only approached to bf16 rounding (documented in docs/fsdp.md)
    assert r0["err"] <= BF16_RTOL, f"relative error {r0['err']:.3g}"


@pytest.mark.parametrize("name,needle", [
    ("error-hsdp", "HSDP"),
    ("error-tensor-parallel", "tensor parallelism"),
    ("error-backward-after-synchronize", "zero_grad"),
    ("error-built-before-sharding", "was replaced after ProjectedAccumulator was built"),
])
def test_unsupported_layouts_raise(results, name, needle):
    for r in range(WORLD):
        got = results[r][name]
        assert got.get("raised") == "ValueError", f"rank {r}: {got}"
        assert needle in got["message"], f"rank {r}: {got['message']}"


def test_cpu_offload_layout_is_rejected():
    """CPU offload (sharded parameters on the CPU, compute on a GPU mesh) cannot be built on this CPU-only
    machine: the layout check is exercised with a stand-in parameter."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Shard

    from proma.fsdp import FsdpRoute

    mesh = SimpleNamespace(ndim=1, device_type="cuda")
    param = SimpleNamespace(device=torch.device("cpu"), device_mesh=mesh, placements=(Shard(0),), shape=(4, 2),
                            dim=lambda: 2)
    with pytest.raises(ValueError, match="CPU offload"):
        FsdpRoute._check_layout(SimpleNamespace(name="w", param=param), mesh, Shard)
