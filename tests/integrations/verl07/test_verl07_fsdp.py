"""PromaDataParallelPPOActor under FSDP2 (``fully_shard`` of every decoder layer and the root), gloo on CPU, float64:
one process and two (``torch.multiprocessing.spawn``, as the other distributed tests). Variant "none" equals plain
verl's sharded gradients; exact PROMA (``proma_sync="global"`` on two ranks) equals the reference on the union
micro-batches with weights / W (:mod:`verification.oracle.verl` writes that case)."""
from __future__ import annotations

import json
import os
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("verl.workers.actor.dp_actor", reason="needs verl==0.7.1 (pip install '.[verl07]', docs/verl.md)")

from verification.testkit import free_port, pin_threads, rel_err  # noqa: E402
from verification.tolerances import FLOAT64_ATOL, FLOAT64_RTOL  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _run(rank, world, outdir):
    import torch.distributed as dist
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    from proma.integrations.verl import PromaActorConfig, PromaDataParallelPPOActor
    from verification.oracle import verl as judge
    from verification.oracle.settings import Settings

    batch = judge.grpo_batch()
    half = len(batch) // world
    local = batch[rank * half:(rank + 1) * half]   # rank r's share, as verl's dispatch splits the batch
    runs = {"plain": (DataParallelPPOActor, None, None),
            "none": (PromaDataParallelPPOActor, PromaActorConfig, dict(proma_variant="none")),
            "exact": (PromaDataParallelPPOActor, PromaActorConfig,
                      dict(proma_variant="proma", proma_solver="exact", proma_sync="global"))}
    out = {}
    for name, (cls, config_cls, extra) in runs.items():
        model = _shard(judge.tiny_qwen3(tied=False, bias=True), world)
        config = judge.actor_config(config_cls, batch_size=half, micro_batch=judge.MICRO_BATCH // world,
                                    **(extra or {}))
        mbs, running = judge.run_actor(cls, model, config, local)
        final = running[-1]
        out[name] = {n: g.tolist() for n, g in final.items() if g is not None}
        if name == "exact":   # the reference case on the union micro-batches (weights / W), written on every rank
            weights = judge.verl_weights(config, mbs)
            parts = [None] * world
            dist.all_gather_object(parts, (mbs, weights))
            union = [{k: torch.cat([p[0][m][k] for p in parts]) for k in mbs[m]} for m in range(len(mbs))]
            union_w = [np.concatenate([p[1][m] for p in parts]) / world for m in range(len(mbs))]
            case = judge.build_case(judge.tiny_qwen3(tied=False, bias=True), union, union_w,
                                    Settings(variant="proma", solver="exact"), "fsdp", "union")
            last = case.n_microbatches - 1
            out["expected"] = {layer.name: case.expected(last, k).tolist() for k, layer in enumerate(case.layers)}
    if rank == 0:
        with open(os.path.join(outdir, f"world{world}.json"), "w") as f:
            json.dump(out, f)


def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    pin_threads()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(rank, world, outdir)
    except Exception:  # noqa: BLE001  (the test reports it)
        with open(os.path.join(outdir, f"crash{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2], ids=["one_process", "two_processes"])
def grads(request, tmp_path_factory):
    world = request.param
    outdir = tmp_path_factory.mktemp(f"verl_fsdp{world}")
    mp.spawn(_worker, args=(world, free_port(), str(outdir)), nprocs=world, join=True)
    crashes = sorted(outdir.glob("crash*.txt"))
    assert not crashes, crashes[0].read_text()
    data = json.loads((outdir / f"world{world}.json").read_text())
    return {run: {n: np.asarray(g) for n, g in d.items()} for run, d in data.items()}


def test_none_equals_plain_verl_under_fsdp2(grads):
    assert set(grads["none"]) == set(grads["plain"]) and grads["plain"]
    for name, want in grads["plain"].items():
        assert rel_err(grads["none"][name], want) <= FLOAT64_ATOL, name


def test_exact_global_equals_the_reference_on_the_union_microbatches(grads):
    assert set(grads["exact"]) == set(grads["expected"])
    for name, want in grads["expected"].items():
        err = rel_err(grads["exact"][name], want)
        assert err <= FLOAT64_RTOL, f"{name}: relative error {err:.3g}"
    # and PROMA changed the gradient (the comparison is not vacuous)
    assert max(rel_err(grads["exact"][n], grads["plain"][n]) for n in grads["plain"]) > 1e-3
