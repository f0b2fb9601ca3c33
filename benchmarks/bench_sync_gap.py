"""How far ``sync="local"`` is from ``sync="global"`` PROMA on real GSM8K microbatches (W simulated ranks).

Usage::

    python benchmarks/bench_sync_gap.py --cache-dir runs/cache --steps 3 [--world 2] [--out reports/sync_gap.md]

For each rollout step of the harness's ``small`` configuration (warm-started policy, float32, ``proma`` exact),
the first minibatch is laid out as ``torchrun`` with W ranks lays it out (rank r: the groups of its 1/W of the
prompts; local microbatches of ``microbatch_size / W`` sequences). Both semantics are computed in one process
from their definitions (the distributed tests show that the ranks compute exactly these):

- global: PROMA whose microbatch k is the union of the ranks' k-th microbatches (= one process, same config);
- local:  sum over ranks of PROMA on the rank's own microbatches (the mean over ranks of each rank's PROMA
  with its loss weights, which are W times its share, see ``proma.rl.distributed``);
- plain:  the REINFORCE gradient sum_i w_i g_i.

Reported per step: ||local - global|| / ||global||, the cosine of local and global, and for scale
||plain - global|| / ||global|| (how much the projection changes the gradient at all).
"""
from __future__ import annotations

import argparse
import sys

import torch

from proma import ProjectedAccumulator
from proma.rl.config import TrainConfig
from proma.rl.batching import microbatches, minibatch_order, minibatch_weights
from proma.rl.build import build_run
from proma.rl.generation import select
from proma.rl.losses import completion_logprobs
from proma.rl.rollout import collect_rollout


def accumulate(model, ro, mbs, weights_of, **kw):
    """Flat gradient of the accumulator over the microbatches ``mbs`` (lists of rows)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with ProjectedAccumulator(model, **kw) as acc:
        acc.zero_grad()
        for rows in mbs:
            acc.backward(completion_logprobs(model, select(ro.batch, rows)), weights_of(rows))
        return torch.cat([p.grad.reshape(-1).double() for p in params])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(method="proma", cache_dir=args.cache_dir, out="runs/sync_gap", progress=False)
    s = build_run(cfg, log=lambda *a: print(*a, file=sys.stderr))
    W, half = args.world, cfg.rollout_size // args.world
    lcfg = cfg.replace(prompts_per_step=cfg.prompts_per_step // W, microbatch_size=cfg.microbatch_size // W)
    lines = [f"small preset ({cfg.hidden_size} hidden, {cfg.num_layers} layers), proma exact, W = {W}, minibatch of "
             f"{cfg.minibatch_size} = {W} x {lcfg.minibatch_size} sequences, global microbatch {cfg.microbatch_size}",
             "", "| step | reward | local vs global: rel. diff | cosine | plain vs global: rel. diff |",
             "|---|---|---|---|---|"]
    for step in range(args.steps):
        ro = collect_rollout(s, step)
        order = minibatch_order(lcfg, step)[: lcfg.minibatch_size]
        ranks = [[r * half + int(i) for i in order] for r in range(W)]       # each rank's first local minibatch
        rows = [x for rk in ranks for x in rk]
        w_all, _ = minibatch_weights(cfg, ro, rows)                          # global token-mean weights
        w_of = dict(zip(rows, w_all.tolist()))

        def weights(mb):
            return torch.tensor([w_of[r] for r in mb], dtype=torch.float32)

        local_mbs = [microbatches(lcfg, rk) for rk in ranks]
        unions = [[x for r in range(W) for x in local_mbs[r][k]] for k in range(len(local_mbs[0]))]
        g_global = accumulate(s.model, ro, unions, weights, variant="proma")
        g_local = sum(accumulate(s.model, ro, local_mbs[r], weights, variant="proma") for r in range(W))
        g_plain = accumulate(s.model, ro, unions, weights, variant="none")
        n = float(g_global.norm())
        if n == 0:
            lines.append(f"| {step} | {float(ro.rewards.mean()):.3f} | (zero gradient: all advantages 0) | | |")
            continue
        cos = float(g_local @ g_global) / (float(g_local.norm()) * n)
        lines.append(f"| {step} | {float(ro.rewards.mean()):.3f} | {float((g_local - g_global).norm()) / n:.3f} | "
                     f"{cos:.4f} | {float((g_plain - g_global).norm()) / n:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
