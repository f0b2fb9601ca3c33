"""PromaGRPOTrainer under accelerate's FSDP2 on two CPU processes (gloo): one optimizer step each.

accelerate 1.16 turns FSDP on only for GPU-like distributed types: on CPU (``use_cpu=True``, gloo) the
``fsdp`` / ``fsdp_config`` arguments are ignored without an error and the model trains unsharded under
``DistributedType.MULTI_CPU`` (pinned by :func:`test_accelerate_ignores_fsdp_on_cpu`). To exercise the real
FSDP2 path of accelerate (``fully_shard`` of every ``Qwen3DecoderLayer`` and the root in
``Accelerator.prepare``, ``no_sync`` as ``set_requires_gradient_sync(False)``) on CPU, each worker relabels the
process state as ``MULTI_GPU`` before the trainer builds its ``Accelerator`` (:data:`FSDP_ON_CPU`), the one
line that gate needs; the rest of accelerate, TRL and the trainer run unchanged.

Plain ``GRPOTrainer`` and ``PromaGRPOTrainer`` (``proma_variant="none"``, then exact PROMA with
``proma_sync="global"``) train one step from the same initial policy and seed; the gradients before the
optimizer step (``full_tensor()`` of the sharded ``p.grad``) are compared on rank 0.
"""
from __future__ import annotations

import datetime
import json
import os
import traceback
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from verification.testkit import free_port, pin_threads, rel_err
from verification.tolerances import FLOAT32_RTOL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
FSDP_ARGS = dict(fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                           "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"]})
RUNS = {"plain": None, "none": dict(proma_variant="none"),
        "proma-global": dict(proma_variant="proma", proma_solver="exact", proma_sync="global")}
FSDP_ON_CPU = True


def _train(name, outdir, rank):
    from verification import trl_testkit as tk
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer

    extra = RUNS[name]
    cls, cfg = (GRPOTrainer, GRPOConfig) if extra is None else (PromaGRPOTrainer, PromaGRPOConfig)
    args = tk.config(cfg, os.path.join(outdir, name), **FSDP_ARGS, **(extra or {}))   # sets up the process state
    state = PartialState()
    found = str(state.distributed_type)
    if FSDP_ON_CPU:
        state.distributed_type = DistributedType.MULTI_GPU   # accelerate's FSDP gate (see the module docstring)
    tok = tk.tiny_tokenizer()
    model = tk.tiny_policy(tok)
    grads, kinds = {}, set()

    class Snapshot(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            for n, p in model.named_parameters():
                kinds.add(type(p.grad).__name__ if p.grad is not None else f"None: {n}")
                grads[n] = None if p.grad is None else p.grad.full_tensor().detach().double().clone()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, reward_funcs=tk.length_reward, args=args, train_dataset=tk.dataset(),
                      processing_class=tok, callbacks=[Snapshot()])
        trainer.train()
    if rank == 0:
        torch.save(grads, os.path.join(outdir, f"{name}.pt"))
    return {"state_before": found, "is_fsdp2": bool(trainer.accelerator.is_fsdp2), "grad_types": sorted(kinds),
            "steps": int(trainer.state.global_step)}


def _worker(rank, port, outdir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    pin_threads()
    results = {}
    for name in RUNS:
        try:
            results[name] = _train(name, outdir, rank)
        except Exception:  # noqa: BLE001  (the test reports it)
            results[name] = {"crashed": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier(timeout=datetime.timedelta(seconds=60))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("trl")
    outdir = tmp_path_factory.mktemp("trl_fsdp")
    mp.spawn(_worker, args=(free_port(), str(outdir)), nprocs=WORLD, join=True)
    runs = [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in range(WORLD):
        for name, got in runs[r].items():
            assert "crashed" not in got, f"rank {r}, {name}:\n{got['crashed']}"
    grads = {name: torch.load(outdir / f"{name}.pt") for name in RUNS}
    return runs, grads


def _flat(grads):
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())]).numpy()


def test_accelerate_ignores_fsdp_on_cpu(results):
    runs, _ = results
    # the pinned limitation: without the relabelling accelerate would train unsharded (MULTI_CPU)
    assert runs[0]["plain"]["state_before"] == "DistributedType.MULTI_CPU"


@pytest.mark.parametrize("name", list(RUNS))
def test_each_trainer_runs_one_step_on_sharded_gradients(results, name):
    runs, _ = results
    for r in range(WORLD):
        got = runs[r][name]
        assert got["is_fsdp2"] and got["grad_types"] == ["DTensor"] and got["steps"] == 1, got


def test_none_equals_plain_grpo_trainer_under_fsdp2(results):
    _, grads = results
    assert set(grads["none"]) == set(grads["plain"])
    err = rel_err(_flat(grads["none"]), _flat(grads["plain"]))
    assert err <= FLOAT32_RTOL, f"PromaGRPOTrainer(none) vs GRPOTrainer: relative error {err:.3g}"


def test_proma_changes_the_gradient(results):
    _, grads = results
    # exact PROMA on the union microbatches removes a component: it must not equal plain accumulation
    assert rel_err(_flat(grads["proma-global"]), _flat(grads["plain"])) > 1e-3
