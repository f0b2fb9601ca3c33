"""Two ranks on one device: sync="global" PROMA with the model on ``--device`` against one process on the unions.

Usage: ``python benchmarks/check_distributed_device.py --device cuda`` (exits non-zero on failure). Both ranks
share the device and talk through gloo (NCCL needs one GPU per rank), so this checks the device handling of
:mod:`proma.distributed` (factors packed on the device, exchanged through host buffers, merged back), not
NCCL. The oracle: a single-process accumulator (a one-rank group) on the concatenated microbatches, in
float64 (itself checked against ``reference.accumulate`` by the test suite).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proma import ProjectedAccumulator
from verification.testkit import GENERIC_PERTURBATION, free_port, qwen_seq_logp, rel_err, tiny_qwen3

TOL = 1e-9
CASES = [dict(solver="exact"), dict(solver="exact", strategy="ghost"), dict(solver="gram_schmidt", relative_bound=0.5)]


def batches(device, sizes=((3, 2), (2, 3)), T=9, vocab=50):
    gen = torch.Generator().manual_seed(3)
    out = []
    for row in sizes:
        mine = []
        for b in row:
            ids = torch.randint(0, vocab, (b, T), generator=gen)
            lengths = torch.randint(2, T + 1, (b,), generator=gen)
            mask = (torch.arange(T)[None] < lengths[:, None]).long()
            mine.append(((ids.to(device), mask.to(device)), torch.randn(b, generator=gen, dtype=torch.float64)))
        out.append(mine)
    return out


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]).double().cpu()


def worker(rank, port, device, failures):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    solo = [dist.new_group([r]) for r in range(2)]
    data = batches(device)
    for kw in CASES:
        model = tiny_qwen3(torch.float64, perturb=GENERIC_PERTURBATION).to(device)
        with ProjectedAccumulator(model, sync="global", **kw) as acc:
            acc.zero_grad()
            for batch, w in data[rank]:
                acc.backward(qwen_seq_logp(model, *batch), w.to(device))
            acc.synchronize()
            got = grads(model)
            comm = acc.comm_stats()
        if rank == 0:
            with ProjectedAccumulator(model, process_group=solo[0], **kw) as one:
                one.zero_grad()
                for k in range(len(data[0])):
                    ids = torch.cat([data[r][k][0][0] for r in range(2)])
                    mask = torch.cat([data[r][k][0][1] for r in range(2)])
                    w = torch.cat([data[r][k][1] for r in range(2)]) / 2
                    one.backward(qwen_seq_logp(model, ids, mask), w.to(device))
                want = grads(model)
            err = rel_err(got.numpy(), want.numpy())
            ok = err <= TOL
            print(f"{device} {kw}: rel err {err:.2e} {'ok' if ok else 'FAIL'}; sent {comm['payload_bytes']} bytes "
                  f"in {comm['collectives']} collectives", flush=True)
            if not ok:
                failures.put(str(kw))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    port = free_port()
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(port, args.device, failures), nprocs=2, join=True)
    bad = []
    while not failures.empty():
        bad.append(failures.get())
    if bad:
        sys.exit(f"FAILED: {bad}")
    print("all ok")


if __name__ == "__main__":
    main()
