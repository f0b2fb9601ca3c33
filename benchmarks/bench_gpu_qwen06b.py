"""Step time and peak memory of PROMA on a GPU: a Qwen3-0.6B-shaped bf16 model, plain vs exact vs intra.

Usage (on a machine with CUDA; no thread variables needed)::

    PYTHONPATH=. python benchmarks/bench_gpu_qwen06b.py                 # markdown rows -> stdout
    PYTHONPATH=. python benchmarks/bench_gpu_qwen06b.py --repeats 5 --T 512 --b 8

Model: ``Qwen3Config`` with Qwen3-0.6B's shapes (hidden 1024, 28 layers, 16 query / 8 key-value heads of 128,
MLP 3072, vocabulary 151936, tied embeddings), random initialisation (no weights are downloaded), bf16
parameters, SDPA attention. A step is ``zero_grad`` + 4 microbatches of ``b`` x ``T`` random tokens (every
token scored) through forward + ``acc.backward``. Timing: wall clock with ``torch.cuda.synchronize()`` around
each step, the minimum over ``--repeats`` interleaved rounds after one warm-up step per method, reported as a
ratio to ``plain`` (``variant="none"``) in the same process. Peak memory: ``torch.cuda.max_memory_allocated``
over one step of each method, after the warm-up, as a ratio to plain's. Host synchronisations: the number of
synchronising CUDA calls torch reports (``torch.cuda.set_sync_debug_mode("warn")``) during one microbatch's
``acc.backward``, per method.

Without CUDA it prints a message saying so and exits with status 0 (nothing is measured).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings

import torch

METHODS = {
    "plain": dict(variant="none"),
    "proma/exact": dict(variant="proma", solver="exact"),
    "intra": dict(variant="intra", intra_rank=1),
}
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                 tie_word_embeddings=True)
MICROBATCHES = 4


def build(b: int, T: int, seed: int = 0):
    """The bf16 model on CUDA and ``MICROBATCHES`` microbatches ``(ids (b, T), weights (b,))``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(**QWEN3_06B, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    batches = [(torch.randint(0, cfg.vocab_size, (b, T), generator=gen, device="cuda"),
                torch.randn(b, generator=gen, device="cuda", dtype=torch.float32)) for _ in range(MICROBATCHES)]
    return model, batches


def seq_logp(model, ids: torch.Tensor) -> torch.Tensor:
    """(b,) sum of next-token log-probabilities (float32 log-softmax)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(dim=1)


def make_step(model, batches, options: dict):
    """A callable running one optimizer step's accumulation with ``ProjectedAccumulator(**options)``."""
    from proma import ProjectedAccumulator

    acc = ProjectedAccumulator(model, **options)

    def step():
        acc.zero_grad()
        for ids, w in batches:
            acc.backward(seq_logp(model, ids), w)
    return step, acc


def alone(steps: dict) -> dict:
    """``{name: (step, acc)}`` -> ``{name: step}`` with every other accumulator paused during a step (they share
    the model; their hooks would otherwise tap every forward)."""
    def wrap(name, step):
        def run():
            with contextlib.ExitStack() as stack:
                for other, (_, acc) in steps.items():
                    if other != name:
                        stack.enter_context(acc.paused())
                step()
        return run
    return {name: wrap(name, step) for name, (step, _) in steps.items()}


def timed(step) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_bytes(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def syncs_in_backward(model, batches, acc) -> int:
    """Synchronising CUDA calls torch reports during one ``acc.backward`` (a microbatch after the first)."""
    acc.zero_grad()
    ids, w = batches[0]
    acc.backward(seq_logp(model, ids), w)
    ids, w = batches[1]
    lp = seq_logp(model, ids)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            acc.backward(lp, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(c.message) for c in caught)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_qwen06b: no CUDA device is available here; nothing was measured "
              "(run it on a machine with a GPU).")
        return 0
    model, batches = build(args.b, args.T)
    steps = {m: make_step(model, batches, o) for m, o in METHODS.items()}
    runs = alone(steps)
    for run in runs.values():
        run()  # warm-up (kernels, allocator)
    wall = {m: [] for m in steps}
    for _ in range(args.repeats):
        for m, run in runs.items():
            wall[m].append(timed(run))
    best = {m: min(v) for m, v in wall.items()}
    peak = {m: peak_bytes(run) for m, run in runs.items()}
    syncs = {}
    for m, (_, acc) in steps.items():
        with contextlib.ExitStack() as stack:
            for other, (_, a) in steps.items():
                if other != m:
                    stack.enter_context(a.paused())
            syncs[m] = syncs_in_backward(model, batches, acc)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Qwen3-0.6B shapes, bf16, random init, "
          f"{MICROBATCHES} x ({args.b} x {args.T}) tokens, min of {args.repeats} interleaved steps after a warm-up")
    print("| method | step (ms) | x plain | peak memory (GiB) | x plain | syncs in one backward |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in steps:
        print(f"| {m} | {1e3 * best[m]:.1f} | {best[m] / best['plain']:.2f} | {peak[m] / 2**30:.2f} | "
              f"{peak[m] / peak['plain']:.2f} | {syncs[m]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
