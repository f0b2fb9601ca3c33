"""What one linear layer's exact projection costs, part by part, against that layer's own plain work.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_block_floor.py            # the harness's and qwen128's shapes
    OMP_NUM_THREADS=1 python benchmarks/bench_block_floor.py --shape 16 24 512 192

For a linear layer ``o x i`` called on a microbatch of b sequences x n tokens (X (b, n, i), D (b, n, o)), plain
accumulation does three matmuls of ``b n o i`` multiply-adds (forward, input gradient, weight gradient).
Exact PROMA replaces the weight gradient by its per-sequence form and adds a float64 Gram ``K = g g^T`` and
inner products; its two routes (:mod:`proma.layers.block`) are

- materialise: ``g = bmm(D^T, X)`` (b, o i) in float32 [replaces the weight gradient], ``g -> float64``,
  ``K = g g^T`` (b^2 o i in float64), ``h = g G`` and the update ``a^T g`` (b o i each);
- ghost: ``(D D^T) * (X X^T)`` over the b n tokens in float64 ((b n)^2 (o + i)), h and the update through the
  factors.

Each part is timed alone (CPU time of one thread, minimum of ``--repeats`` after a warm-up) and printed as a
ratio to the layer's plain work (the three matmuls). The float32 Gram is printed for comparison only: it is
what a float64 Gram would cost at float32 speed, not an exact route (see reports/benchmarks.md).
"""
from __future__ import annotations

import argparse
import time

import torch

# (b, n, o, i): the RL harness's MLP projections (16 sequences x 24 tokens, hidden 192, MLP 512) and attention
# output, and qwen128's MLP projection (8 x 128, hidden 256, MLP 768)
SHAPES = [(16, 24, 512, 192), (16, 24, 192, 192), (8, 128, 768, 256)]


def cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return 1e3 * best


def parts(b: int, n: int, o: int, i: int) -> dict:
    """The timed parts of one layer: name -> zero-argument function."""
    gen = torch.Generator().manual_seed(0)
    X, D, W = (torch.randn(*s, generator=gen) for s in ((b, n, i), (b, n, o), (o, i)))
    a = torch.randn(b, generator=gen)
    g = torch.bmm(D.transpose(1, 2), X).reshape(b, -1)
    g64 = g.double()
    D64, X64 = D.reshape(-1, o).double(), X.reshape(-1, i).double()
    Xf, Df = X.reshape(-1, i), D.reshape(-1, o)
    return {
        "plain: forward + input grad + weight grad": lambda: (Xf @ W.T, Df @ W, Df.T @ Xf),
        "per-sequence gradients bmm (replaces weight grad)": lambda: torch.bmm(D.transpose(1, 2), X),
        "g -> float64": lambda: g.double(),
        "Gram g g^T float64": lambda: g64 @ g64.T,
        "h = g G and update a^T g (float32)": lambda: (g @ W.reshape(-1), a @ g),
        "ghost token Grams float64": lambda: (D64 @ D64.T) * (X64 @ X64.T),
        "(comparison) Gram g g^T float32": lambda: g @ g.T,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=4, type=int, action="append", metavar=("B", "N", "O", "I"))
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for b, n, o, i in args.shape or SHAPES:
        times = {name: cpu_ms(fn, args.repeats) for name, fn in parts(b, n, o, i).items()}
        plain = times["plain: forward + input grad + weight grad"]
        mat = (times["g -> float64"] + times["Gram g g^T float64"] + times["h = g G and update a^T g (float32)"]
               + times["per-sequence gradients bmm (replaces weight grad)"] - plain / 3)
        print(f"\nlayer {o} x {i}, b={b} sequences x n={n} tokens (torch {torch.__version__}, 1 thread, "
              f"min of {args.repeats})")
        print("| part | ms | x layer's plain work |\n|---|---:|---:|")
        for name, ms in times.items():
            print(f"| {name} | {ms:.2f} | {ms / plain:.2f} |")
        print(f"| materialise route, extra over plain (bmm - weight grad + float64 + Gram + h + update) | {mat:.2f} "
              f"| {mat / plain:.2f} |")


if __name__ == "__main__":
    main()
