"""The cost table of issue 10: ProjectedAccumulator step time and peak memory as ratios to plain accumulation.

Usage (no thread variables: the environment a user has)::

    PYTHONPATH=. python benchmarks/bench_targets.py                 # every configuration, markdown rows -> stdout
    PYTHONPATH=. python benchmarks/bench_targets.py --config harness --repeats 9
    PYTHONPATH=. python benchmarks/bench_targets.py --profile harness:proma/exact   # cProfile of one method instead

(``PYTHONPATH=.`` so that the checkout's ``proma`` is imported, not an installed one.)

Configurations (CPU, float32, ``torch.set_num_threads(--threads)``, default 1, 4 microbatches per optimizer step):

- ``qwen128``: Qwen3 (hidden 256, 4 layers, 4/2 heads of 64, MLP 768, vocabulary 2048, tied embeddings),
  microbatches of 8 sequences x 128 tokens (random lengths T/2..T, right padding), every token scored;
- ``qwen64``: the same at 8 x 64 tokens;
- ``harness``: the RL harness's policy (hidden 192, 4 layers, 4/2 heads of 48, MLP 512, vocabulary 512,
  tied), microbatches of 16 sequences x 24 tokens of which the last 10 are scored (prompt + completion).

Methods: ``plain`` = ``variant="none"``; ``proma/exact``; ``proma/gs2+b0.5`` (the published settings:
Gram-Schmidt, 2 passes, relative bound 0.5); ``proma/ridge``; ``intra`` (rank 1, two-sided).

Step time = ``zero_grad`` + 4 x (forward + ``acc.backward``); the headline is the minimum over ``--repeats``
interleaved repetitions after one warm-up step of the step's **wall-clock** time, as a ratio to ``plain``
measured in the same process (methods alternate, so load from other processes hits all of them; every other
method's accumulator is paused during a step, so no step pays for another method's hooks). The
process's CPU time (``time.process_time``, every thread of the process, so a library's own thread pool
is counted) is an extra column in parentheses. Peak memory: each method in a fresh subprocess,
``VmHWM - VmRSS`` over one step after a warm-up (as :mod:`bench_accumulator`), reported as
``(extra - plain extra) / plain extra``.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time

import torch

from bench_accumulator import accumulator_step, status_kib  # noqa: E402  (benchmarks/ is the script's directory)

CONFIGS = {
    "qwen128": dict(hidden=256, layers=4, heads=4, kv=2, mlp=768, vocab=2048, b=8, T=128, scored=None),
    "qwen64": dict(hidden=256, layers=4, heads=4, kv=2, mlp=768, vocab=2048, b=8, T=64, scored=None),
    "harness": dict(hidden=192, layers=4, heads=4, kv=2, mlp=512, vocab=512, b=16, T=24, scored=10),
}
METHODS = {
    "plain": dict(variant="none"),
    "proma/exact": dict(variant="proma", solver="exact"),
    "proma/gs2+b0.5": dict(variant="proma", solver="gram_schmidt", passes=2, relative_bound=0.5),
    "proma/ridge": dict(variant="proma", solver="ridge"),
    "intra": dict(variant="intra", intra_rank=1),
}
MICROBATCHES = 4


def build(config: str, seed: int = 0):
    """Model, microbatches [((ids, score_mask), weights)] and the seq_logp function of a configuration."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = CONFIGS[config]
    cfg = Qwen3Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["mlp"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv"],
                      head_dim=c["hidden"] // c["heads"], max_position_embeddings=512, tie_word_embeddings=True,
                      attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    b, T = c["b"], c["T"]
    batches = []
    for _ in range(MICROBATCHES):
        ids = torch.randint(0, c["vocab"], (b, T), generator=gen)
        if c["scored"] is None:
            lengths = torch.randint(T // 2, T + 1, (b,), generator=gen)
            mask = (torch.arange(T)[None] < lengths[:, None]).float()
        else:
            mask = (torch.arange(T)[None] >= T - c["scored"]).float().expand(b, T)
        batches.append(((ids, mask), torch.randn(b, generator=gen)))
    return model, batches, seq_logp


def seq_logp(model, batch):
    """(b,) sum of the next-token log-probabilities of the scored tokens."""
    ids, mask = batch
    logits = model(input_ids=ids).logits
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * mask[:, 1:]).sum(dim=1)


def step_fn(method, model, batches, forward):
    return accumulator_step(model, batches, forward, METHODS[method])


def alone(steps: dict) -> dict:
    """``{name: (step, acc)}`` -> ``{name: step}`` where each step runs with every *other* accumulator paused.

    The accumulators share one model, and each one's forward hooks would otherwise tap (and keep the inputs
    of) every forward, also those of the other methods' steps, plain's included.
    """
    def wrap(name, step):
        def run():
            with contextlib.ExitStack() as stack:
                for other, (_, acc) in steps.items():
                    if other != name and acc is not None:
                        stack.enter_context(acc.paused())
                step()
        return run
    return {name: wrap(name, step) for name, (step, _) in steps.items()}


def time_config(config, methods, repeats):
    model, batches, forward = build(config)
    return time_steps(alone({m: step_fn(m, model, batches, forward) for m in methods}), repeats)


def time_steps(steps: dict, repeats: int):
    """Minimum wall and CPU seconds of every step in ``steps`` (``{name: callable}``): one warm-up call each,
    then ``repeats`` interleaved rounds. Returns ``(wall, cpu)``, each ``{name: seconds}``."""
    for step in steps.values():
        step()
    wall, cpu = {m: [] for m in steps}, {m: [] for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            cpu[m].append(time.process_time() - c0)
            wall[m].append(time.perf_counter() - t0)
    return {m: min(v) for m, v in wall.items()}, {m: min(v) for m, v in cpu.items()}


def memory_child(config, method, threads):
    torch.set_num_threads(threads)
    model, batches, forward = build(config)
    step, acc = step_fn(method, model, batches, forward)
    step()
    acc.zero_grad()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS")
    step()
    print(json.dumps({"extra_bytes": (status_kib("VmHWM") - base) * 1024}))


def memory(config, method, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child-memory", config, method, "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def profile(config, method, top):
    model, batches, forward = build(config)
    step, _ = step_fn(method, model, batches, forward)
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: all")
    ap.add_argument("--method", action="append", choices=[m for m in METHODS if m != "plain"], help="default: all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--profile", metavar="CONFIG:METHOD")
    ap.add_argument("--child-memory", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        memory_child(*args.child_memory, args.threads)
        return
    if args.profile:
        profile(*args.profile.split(":", 1), top=30)
        return
    methods = ["plain"] + (args.method or [m for m in METHODS if m != "plain"])
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), thread variables: "
          f"{ {k: v for k, v in os.environ.items() if k.endswith('NUM_THREADS')} or 'none'}, load average "
          f"{os.getloadavg()[0]:.1f} at start; min of {args.repeats} interleaved steps after a warm-up; wall-clock "
          "ratio to plain in the same process (process CPU-time ratio in parentheses)")
    print("| configuration | " + " | ".join(f"{m} x plain" for m in methods[1:]) + " | plain step wall (CPU) ms |"
          + (" peak extra vs plain (per method) |" if not args.no_memory else ""))
    print("|---|" + "---:|" * (len(methods)) + ("---|" if not args.no_memory else ""))
    for config in args.config or list(CONFIGS):
        wall, cpu = time_config(config, methods, args.repeats)
        row = f"| {config} | " + " | ".join(f"{wall[m] / wall['plain']:.2f} ({cpu[m] / cpu['plain']:.2f})"
                                           for m in methods[1:])
        row += f" | {1e3 * wall['plain']:.0f} ({1e3 * cpu['plain']:.0f}) |"
        if not args.no_memory:
            mem = {m: memory(config, m, args.threads) for m in methods}
            row += " " + ", ".join(f"{(mem[m] - mem['plain']) / mem['plain']:+.2f}" for m in methods[1:]) + " |"
        print(row + f" load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
