"""Step time and communicated bytes of data-parallel PROMA on W CPU processes (gloo on 127.0.0.1).

Usage::

    python benchmarks/bench_distributed.py                   # 2 ranks, markdown table -> stdout
    python benchmarks/bench_distributed.py --out reports/bench_distributed.md --json reports/bench_distributed.json
    python benchmarks/bench_distributed.py --quick

Workload: the small Qwen3 of ``benchmarks/bench_accumulator.py`` (hidden 256, 4 layers, vocabulary 512,
tied embeddings, float32); every rank holds ``--microbatches`` microbatches of ``--b`` sequences of ``--T``
tokens (random lengths, its own data), one optimizer step = all of them.

Methods (each rank, one step):

- ``ddp/plain``: ``DistributedDataParallel``, ``(w * seq_logp).sum().backward()`` per microbatch inside
  ``no_sync()`` except the last (DDP's usual accumulation: one bucketed gradient all-reduce per step);
- ``plain+sync``: ``ProjectedAccumulator(variant="none")`` and ``synchronize()`` (one all-reduce);
- ``proma/local``: exact PROMA per rank, ``synchronize()`` averages (one all-reduce);
- ``proma/global``: exact PROMA on the union microbatches (factor exchange per microbatch);
- ``intra``: intra-microbatch projection (rank 1), ``synchronize()`` averages.

Step time: ranks start each step after a barrier; a step's time is the slowest rank's; the table gives the
minimum and median over ``--repeats`` interleaved repetitions (methods alternate, so load drift on a
shared machine hits all of them). Bytes: what one rank put into collectives per step (``payload``, padding
included) and sends with ring algorithms (``wire``), from ``ProjectedAccumulator.comm_stats()``; for
``ddp/plain`` the gradient all-reduce DDP performs (its buckets hold every parameter once).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_accumulator import qwen_batches, qwen_seq_logp, small_qwen3  # noqa: E402

from proma import ProjectedAccumulator  # noqa: E402
from proma.distributed import all_reduce_wire_bytes, no_sync  # noqa: E402
from verification.testkit import free_port  # noqa: E402

METHODS = {
    "ddp/plain": None,
    "plain+sync": dict(variant="none"),
    "proma/local": dict(variant="proma", solver="exact", sync="local"),
    "proma/global": dict(variant="proma", solver="exact", sync="global"),
    "intra": dict(variant="intra", intra_rank=1),
}


def _ddp_step(ddp, batches):
    def step():
        ddp.zero_grad(set_to_none=True)
        for k, (batch, w) in enumerate(batches):
            last = k == len(batches) - 1
            ctx = no_sync(ddp) if not last else _null()
            with ctx:
                (w * qwen_seq_logp(ddp, batch)).sum().backward()
        return None
    return step


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _acc_step(acc, model, batches):
    def step():
        acc.zero_grad()
        for batch, w in batches:
            acc.backward(qwen_seq_logp(model, batch), w)
        acc.synchronize()
        return acc.comm_stats()
    return step


def _worker(rank, world, port, args, outfile):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    model = small_qwen3()
    batches = qwen_batches(args.b, args.T, args.microbatches, seed=1 + rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    steps, accs = {}, []
    for name, kw in METHODS.items():
        if kw is None:
            steps[name] = _ddp_step(ddp, batches)
        else:
            acc = ProjectedAccumulator(model, **kw)
            accs.append(acc)
            steps[name] = _acc_step(acc, model, batches)
    times = {name: [] for name in METHODS}
    comm = {}
    for rep in range(args.repeats + 1):          # repetition 0 warms up
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            stats = step()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rep:
                times[name].append(float(dt))
            if stats is not None:
                comm[name] = stats
    P_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    comm["ddp/plain"] = {"world_size": world, "collectives": None, "payload_bytes": P_bytes,
                         "wire_bytes": all_reduce_wire_bytes(P_bytes, world)}
    for acc in accs:
        acc.close()
    if rank == 0:
        with open(outfile, "w") as f:
            json.dump({"times": times, "comm": comm, "P_bytes": P_bytes,
                       "params": sum(p.numel() for p in model.parameters()), "args": vars(args), "world": world}, f)
    dist.destroy_process_group()


def table(res) -> str:
    a, W = res["args"], res["world"]
    lines = [f"Small Qwen3 ({res['params']:,} parameters, float32), {W} CPU processes (gloo), "
             f"{a['threads']} thread(s) each; per rank {a['microbatches']} microbatches x {a['b']} sequences x "
             f"{a['T']} tokens; {a['repeats']} repetitions.", "",
             "| method | step time min (s) | median (s) | collectives / step | payload / step (MB) | "
             "wire / step (MB) | wire vs gradient all-reduce |",
             "|---|---|---|---|---|---|---|"]
    ref = res["comm"]["ddp/plain"]["wire_bytes"]
    for name in METHODS:
        t = res["times"][name]
        c = res["comm"][name]
        coll = "—" if c["collectives"] is None else str(c["collectives"])
        lines.append(f"| {name} | {min(t):.3f} | {statistics.median(t):.3f} | {coll} | "
                     f"{c['payload_bytes'] / 1e6:.2f} | {c['wire_bytes'] / 1e6:.2f} | {c['wire_bytes'] / ref:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, T=32")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.T = 2, 32
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        outfile = os.path.join(tmp, "res.json")
        mp.spawn(_worker, args=(args.world, free_port(), args, outfile), nprocs=args.world, join=True)
        with open(outfile) as f:
            res = json.load(f)
    text = table(res)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
