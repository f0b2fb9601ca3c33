"""Peak memory, bytes communicated and step time of ProjectedAccumulator under FSDP2 against plain FSDP2 accumulation.

Usage::

    python benchmarks/bench_fsdp.py                      # 2 CPU ranks (gloo), markdown table -> stdout
    python benchmarks/bench_fsdp.py --json reports/data/bench_fsdp.json
    python benchmarks/bench_fsdp.py --quick

Workload: a Qwen3 (``--hidden`` 512, 4 layers, vocabulary 2048, tied embeddings, float32) sharded with
``fully_shard`` on every decoder layer and the root; every rank holds ``--microbatches`` microbatches of ``--b``
sequences of ``--T`` tokens (its own data). One step = all microbatches, gradients ready for ``optimizer.step()``
(the optimizer itself is not run: it is the same for every method).

Methods (each rank, one step):

- ``fsdp/plain``: plain FSDP2 gradient accumulation: ``(w * seq_logp).sum().backward()`` per microbatch with
  ``set_requires_gradient_sync(False)`` on all but the last (FSDP2 keeps unsharded gradients meanwhile and
  reduce-scatters once);
- ``none``: ``ProjectedAccumulator(variant="none")`` (FSDP2 reduce-scatters every microbatch itself);
- ``proma/local``, ``proma/global``: exact PROMA, ``sync="local"`` / ``"global"``;
- ``intra``: intra-microbatch projection (rank 1).

Peak memory: each method runs in a fresh pair of processes; after a warm-up step and cleared gradients each rank
resets its kernel peak-RSS counter (``/proc/self/clear_refs`` = 5), runs one step and reads ``VmHWM``; the table
gives the larger rank's peak above its resting RSS ("extra") and the total peak RSS. Bytes: every collective a
rank issues during that step (FSDP2's parameter all-gathers and gradient reduce-scatters, and the
accumulator's own) is counted by wrapping ``torch.distributed``'s functions: ``payload`` = input tensors,
``wire`` = bytes sent with ring algorithms. Step time: one pair of processes, methods interleaved, a step's time is
the slower rank's, minimum over ``--repeats`` repetitions after a warm-up, as a ratio to ``fsdp/plain``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]   # benchmarks/ and the checkout's proma/
from bench_accumulator import qwen_batches, qwen_seq_logp, status_kib  # noqa: E402

from proma import ProjectedAccumulator  # noqa: E402
from proma.distributed import all_gather_wire_bytes, all_reduce_wire_bytes, reduce_scatter_wire_bytes  # noqa: E402
from verification.testkit import free_port  # noqa: E402

METHODS = {
    "fsdp/plain": None,
    "none": dict(variant="none"),
    "proma/local": dict(variant="proma", solver="exact", sync="local"),
    "proma/global": dict(variant="proma", solver="exact", sync="global"),
    "intra": dict(variant="intra", intra_rank=1),
}
VOCAB = 2048
MIB = 1 << 20


def sharded_qwen3(hidden, seed=0):
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=512, tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


# -- counting every collective -------------------------------------------------------------------------------
class Counter:
    """Wraps torch.distributed's collectives; counts the outermost call only (one may call another)."""

    WIRE = {"all_gather_single": "gather", "all_gather_into_tensor": "gather", "all_gather": "gather",
            "reduce_scatter_single": "scatter", "reduce_scatter_tensor": "scatter", "all_reduce": "reduce"}

    def __init__(self):
        self.depth, self.payload, self.wire, self.calls = 0, 0, 0.0, 0
        for name in self.WIRE:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if self.depth == 0:
                self._count(name, args, kwargs)
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return inner

    def _count(self, name, args, kwargs):
        W = dist.get_world_size()
        kind = self.WIRE[name]
        if name == "all_reduce":
            t = args[0] if args else kwargs["tensor"]
        elif name == "all_gather":
            t = args[1] if len(args) > 1 else kwargs["tensor"]
        else:
            t = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
        n = t.numel() * t.element_size()
        self.calls += 1
        self.payload += n
        self.wire += {"gather": all_gather_wire_bytes(n, W), "scatter": reduce_scatter_wire_bytes(n, W),
                      "reduce": all_reduce_wire_bytes(n, W)}[kind]

    def reset(self):
        self.payload, self.wire, self.calls = 0, 0.0, 0


# -- one step of each method ----------------------------------------------------------------------------------
def make_step(name, model, batches):
    kw = METHODS[name]
    if kw is None:
        def plain():
            for k, (batch, w) in enumerate(batches):
                model.set_requires_gradient_sync(k == len(batches) - 1)
                (w * qwen_seq_logp(model, batch)).sum().backward()
        return plain, None
    acc = ProjectedAccumulator(model, **kw)

    def step():
        for batch, w in batches:
            acc.backward(qwen_seq_logp(model, batch), w)
        acc.synchronize()
    return step, acc


def clear(model, acc):
    model.zero_grad(set_to_none=True)
    if acc is not None:
        acc.zero_grad()


def _init(rank, world, port, threads):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=900))


def memory_worker(rank, world, port, args, method, outdir):
    _init(rank, world, port, args.threads)
    counter = Counter()
    model = sharded_qwen3(args.hidden)
    batches = qwen_batches(args.b, args.T, args.microbatches, vocab=VOCAB, seed=1 + rank)
    step, acc = make_step(method, model, batches)
    step()
    clear(model, acc)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS")
    counter.reset()
    step()
    peak = status_kib("VmHWM")
    out = {"base_kib": base, "peak_kib": peak, "payload": counter.payload, "wire": counter.wire,
           "calls": counter.calls, "params": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(outdir, f"mem{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def time_worker(rank, world, port, args, outdir):
    _init(rank, world, port, args.threads)
    model = sharded_qwen3(args.hidden)
    batches = qwen_batches(args.b, args.T, args.microbatches, vocab=VOCAB, seed=1 + rank)
    steps = {name: make_step(name, model, batches) for name in METHODS}
    times = {name: [] for name in METHODS}
    for rep in range(args.repeats + 1):          # repetition 0 warms up
        for name, (step, acc) in steps.items():
            clear(model, acc)
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rep:
                times[name].append(float(dt))
    for _, acc in steps.values():
        if acc is not None:
            acc.close()
    if rank == 0:
        with open(os.path.join(outdir, "time.json"), "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def run(args) -> dict:
    # freed buffers go back to the kernel at once, so the peak RSS is not hidden by the allocator's cache
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    res = {"args": vars(args), "memory": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            mp.spawn(memory_worker, args=(args.world, free_port(), args, method, tmp), nprocs=args.world, join=True)
            res["memory"][method] = [json.load(open(os.path.join(tmp, f"mem{r}.json"))) for r in range(args.world)]
            if args.json:   # partial results survive an interrupted run
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
        if args.repeats:
            mp.spawn(time_worker, args=(args.world, free_port(), args, tmp), nprocs=args.world, join=True)
            res["times"] = json.load(open(os.path.join(tmp, "time.json")))
    return res


def table(res) -> str:
    a = res["args"]
    mem = res["memory"]
    params = mem["fsdp/plain"][0]["params"]
    lines = [f"Qwen3 hidden {a['hidden']}, 4 layers, vocabulary {VOCAB} ({params:,} parameters, float32 gradient "
             f"{params * 4 / MIB:.1f} MiB), `fully_shard` per layer and root, {a['world']} CPU ranks (gloo), "
             f"{a['threads']} thread(s) each; per rank {a['microbatches']} microbatches x {a['b']} sequences x "
             f"{a['T']} tokens.", "",
             "| method | peak above rest, max rank (MiB) | vs fsdp/plain | peak RSS (MiB) | vs fsdp/plain | "
             "collectives / step | payload / step (MiB) | wire / step (MiB) | wire vs fsdp/plain | "
             "step time min (s) | vs fsdp/plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def extra(m):
        return max(r["peak_kib"] - r["base_kib"] for r in mem[m]) / 1024

    def peak(m):
        return max(r["peak_kib"] for r in mem[m]) / 1024

    ref = mem["fsdp/plain"][0]
    times = res.get("times")
    for m in mem:
        r0 = mem[m][0]
        t = f"{min(times[m]):.3f} | {min(times[m]) / min(times['fsdp/plain']):.2f}x" if times and m in times else "— | —"
        lines.append(f"| {m} | {extra(m):.1f} | {extra(m) / extra('fsdp/plain'):.2f}x | {peak(m):.0f} | "
                     f"{peak(m) / peak('fsdp/plain'):.2f}x | {r0['calls']} | {r0['payload'] / MIB:.2f} | "
                     f"{r0['wire'] / MIB:.2f} | {r0['wire'] / ref['wire']:.2f}x | {t} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (0: memory and bytes only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="hidden 128, T=32, 2 repetitions")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="memory runs of these methods only (fsdp/plain is the table's baseline)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.T, args.repeats = 128, 32, 2
    res = run(args)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
