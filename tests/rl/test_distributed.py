"""The harness on two CPU ranks (gloo on 127.0.0.1), as ``torchrun --nproc_per_node 2`` runs it.

1. One optimizer step on fixed rollouts: rank r holds the groups of its half of the prompts; reinforce on two
   ranks must give the gradient and the parameters of one process on all the rollouts, and PROMA
   (sync="global") those of one process whose microbatches are the unions of the ranks' microbatches.
2. ``train()`` end to end under the torchrun environment: one metrics record per optimizer step (rank 0
   writes), and the same seed gives the same records.
"""
from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proma.rl.config import TrainConfig
from proma.rl.distributed import Ranks
from proma.rl.build import build_run
from proma.rl.rollout import RolloutBatch, collect_rollout
from proma.rl.train import train
from verification.testkit import free_port, pin_threads
from verification.tolerances import FLOAT64_RTOL

from rl_testing import accumulate_gradient, rewarding_parity

WORLD = 2
TIME_KEYS = ("time/rollout", "time/train", "time/metrics", "step_time")


def _cfg(cache, out, **changes):
    # float64: the comparison is about the reduction, not float32 summation order
    return TrainConfig.from_preset("smoke", out=str(out), cache_dir=str(cache), **{"dtype": "float64", **changes})


def _rows_of(ro: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The rollout restricted to ``rows`` (same padded width, so every forward sees identical tensors)."""
    return RolloutBatch({k: v[rows] for k, v in ro.batch.items()}, ro.rewards[rows], ro.advantages[rows],
                        ro.n_tokens[rows], [ro.rollout_logp[r] for r in rows] if ro.rollout_logp else [],
                        ro.entropy, ro.truncated_frac, [ro.texts[r] for r in rows])


def _step(cfg, model, ro, rows, ranks=Ranks()):
    """The train loop's optimizer step: returns (flat gradient, flat parameters after one Adam step)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    opt.zero_grad(set_to_none=True)
    accumulate_gradient(cfg, model, ro, rows, ranks=ranks)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    opt.step()
    return grad, torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _step_worker(rank, store, path, results):
    pin_threads()  # a spawned process: the suite's conftest does not run here
    # a file store: no TCP rendezvous port that another process could take between choosing and binding it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        data = torch.load(path, weights_only=False)
        ranks = Ranks(rank, WORLD)
        out = {}
        for method, cfg in data["configs"].items():
            model = data["model"]
            model.load_state_dict(data["state"])
            ro = data["rollout"]
            mine = list(range(rank * ro.rewards.numel() // WORLD, (rank + 1) * ro.rewards.numel() // WORLD))
            local = _rows_of(ro, mine)
            out[method] = _step(ranks.local_config(cfg), model, local, list(range(len(mine))), ranks)
        torch.save(out, results + f".{rank}")
        # leave together: a rank tearing down gloo while its peer is still in a collective aborts the peer
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """Rollouts and single-process steps made here; the same steps on two ranks in spawned processes."""
    tmp = tmp_path_factory.mktemp("dist_step")
    configs = {"reinforce": _cfg(tmp / "cache", tmp / "r", method="reinforce", minibatches=1),
               "proma": _cfg(tmp / "cache", tmp / "p", method="proma", minibatches=1)}
    with rewarding_parity():
        s = build_run(configs["reinforce"], log=lambda *a: None)
        ro = collect_rollout(s, 0)
    state = {k: v.clone() for k, v in s.model.state_dict().items()}
    n = ro.rewards.numel()
    single = {}
    for method, cfg in configs.items():
        s.model.load_state_dict(state)
        # the union of the ranks' k-th microbatches: rows 2k, 2k+1 of each rank's half
        half, mb = n // WORLD, cfg.microbatch_size // WORLD
        rows = [r * half + k * mb + j for k in range(half // mb) for r in range(WORLD) for j in range(mb)]
        single[method] = _step(cfg, s.model, ro, rows)
    path = str(tmp / "data.pt")
    torch.save({"configs": configs, "model": s.model, "state": state, "rollout": ro}, path)
    mp.spawn(_step_worker, args=(str(tmp / "store"), path, str(tmp / "res")), nprocs=WORLD, join=True)
    ranks = [torch.load(str(tmp / f"res.{r}"), weights_only=False) for r in range(WORLD)]
    return single, ranks, ro


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reinforce", "proma"])
def test_two_ranks_take_the_single_process_step(one_step, method):
    single, ranks, ro = one_step
    assert float(ro.advantages.abs().sum()) > 0, "the rollouts must carry a gradient"
    grad, params = single[method]
    assert float(grad.norm()) > 0
    for r in range(WORLD):
        g, p = ranks[r][method]
        assert _rel(g, grad) <= FLOAT64_RTOL, f"rank {r}: gradient differs by {_rel(g, grad):.3g}"
        assert _rel(p, params) <= FLOAT64_RTOL, f"rank {r}: parameters differ by {_rel(p, params):.3g}"


# -- train() end to end under torchrun's environment ----------------------------------------------------------

def _train_worker(rank, port, cfgs):
    pin_threads()  # a spawned process: the suite's conftest does not run here
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    try:
        with rewarding_parity():
            for cfg in cfgs:
                train(cfg, log=lambda *a: None)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_train_under_torchrun_environment_is_reproducible(tmp_path):
    cfgs = [_cfg(tmp_path / "cache", tmp_path / name, method="proma", dtype="float32", steps=1)
            for name in ("a", "b")]
    with rewarding_parity():  # warm-start cache made once here, as a user's earlier run would have
        build_run(cfgs[0].replace(out=str(tmp_path / "warm")), log=lambda *a: None)
    mp.spawn(_train_worker, args=(free_port(), cfgs), nprocs=WORLD, join=True)
    runs = []
    for name in ("a", "b"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs.append([{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines])
    assert len(runs[0]) == cfgs[0].steps * cfgs[0].minibatches   # rank 0 alone writes
    assert runs[0] == runs[1]
    assert any(r["grad_norm"] > 0 for r in runs[0])
    assert all(np.isfinite(r["local_kl"]) and r["proj/microbatches"] == 2 for r in runs[0])
    evals = (tmp_path / "a" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(e)["step"] for e in evals] == [0, 1]
