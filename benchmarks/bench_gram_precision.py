"""What a float32 Gram would buy and what it would cost in accuracy (issue 20, item 3: adaptive precision).

Usage (no thread variables: the environment a user has)::

    PYTHONPATH=. python benchmarks/bench_gram_precision.py                     # harness and qwen128
    PYTHONPATH=. python benchmarks/bench_gram_precision.py --config harness --repeats 7

Two measurements per configuration of :mod:`bench_targets`:

1. **Gain, an upper bound.** Exact PROMA's step with the library's float64 Gram against the same step with every
   materialise-route Gram and inner product formed in float32 with *no* test (``FLOAT32_COLUMNS``-column float32
   products summed in float64), once with the routes the cost model chooses and once with every block
   materialised. Wall clock, ratio to plain accumulation in the same process, minimum of ``--repeats``
   interleaved steps after a warm-up (as ``bench_targets``). An adaptive scheme can only gain less: it adds a
   test and falls back to float64 where the test fails.
2. **Error.** For every materialise-route Gram of one exact step, the largest entry error of the Jacobi-normalised
   float32 Gram against the float64 one, in chunks of 32,768 and ``FLOAT32_COLUMNS`` columns and unchunked, and
   the Gram's smallest normalised eigenvalue (what a test would compare with the error).

The float32 route is installed by replacing :func:`proma.layers.block._gram_update_` for the duration of a step
(a benchmark device, not a library option).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from bench_accumulator import accumulator_step  # noqa: E402  (benchmarks/ is the script's directory)
from bench_targets import alone, build, time_steps  # noqa: E402
from proma.layers import block as B

FLOAT32_COLUMNS = 1 << 12
ERROR_CHUNKS = {"unchunked": None, "32768 columns": 1 << 15, f"{FLOAT32_COLUMNS} columns": FLOAT32_COLUMNS}


def float32_gram_update_(K: torch.Tensor, h: torch.Tensor | None, g: torch.Tensor, Gf: torch.Tensor | None) -> None:
    """``K += g g^T`` and ``h += g Gf`` with float32 products over column chunks, summed in float64."""
    for c0 in range(0, g.shape[1], FLOAT32_COLUMNS):
        gc = g[:, c0:c0 + FLOAT32_COLUMNS]
        K.add_(gc @ gc.T)
        if h is not None:
            h.add_(gc @ Gf[c0:c0 + FLOAT32_COLUMNS])


@contextlib.contextmanager
def float32_grams():
    original = B._gram_update_
    B._gram_update_ = float32_gram_update_
    try:
        yield
    finally:
        B._gram_update_ = original


def in_float32(step):
    def run():
        with float32_grams():
            step()
    return run


def gain(config: str, repeats: int) -> dict:
    """Wall-clock ratios to plain: float64 Grams, float32 Grams (auto routes), float32 Grams (all materialised)."""
    model, batches, forward = build(config)

    def make(**kw):
        return accumulator_step(model, batches, forward, kw)

    plain, exact, f32 = make(variant="none"), make(variant="proma"), make(variant="proma")
    f32_mat = make(variant="proma", strategy="materialize")
    steps = alone({"plain": plain, "float64 Grams": exact, "float32 Grams": (in_float32(f32[0]), f32[1]),
                   "float32 Grams, all materialised": (in_float32(f32_mat[0]), f32_mat[1])})
    wall, _ = time_steps(steps, repeats)
    return {name: t / wall["plain"] for name, t in wall.items() if name != "plain"}


def gram_errors(config: str) -> dict:
    """Largest normalised float32-Gram entry error per chunking, and the smallest normalised eigenvalues."""
    model, batches, forward = build(config)
    step, _ = accumulator_step(model, batches, forward, dict(variant="proma"))
    errors, lam_min = {name: [] for name in ERROR_CHUNKS}, []
    original = B.Block.gram_and_inner

    def recorded(self, G):
        K, h = original(self, G)
        if self._g is not None and self.dtype == torch.float32:
            d = K.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
            scale = torch.outer(d, d)
            lam_min.append(float(torch.linalg.eigvalsh(K / scale)[0]))
            for name, cols in ERROR_CHUNKS.items():
                K32 = torch.zeros_like(K)
                for c0 in range(0, self._g.shape[1], cols or self._g.shape[1]):
                    gc = self._g[:, c0:c0 + (cols or self._g.shape[1])]
                    K32 += (gc @ gc.T).double()
                errors[name].append(float(((K - K32) / scale).abs().max()))
        return K, h

    B.Block.gram_and_inner = recorded
    try:
        step()
    finally:
        B.Block.gram_and_inner = original
    return {"grams": len(lam_min), "errors": {k: max(v) for k, v in errors.items()},
            "lam_min": (min(lam_min), statistics.quantiles(lam_min, n=10)[0]) if len(lam_min) > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", choices=["harness", "qwen128", "qwen64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eps = torch.finfo(torch.float32).eps
    print(f"torch {torch.__version__}, {args.threads} thread(s), min of {args.repeats} interleaved steps; "
          "wall-clock ratio to plain in the same process")
    print("| configuration | exact, float64 Grams | float32 Grams (upper bound of the gain) | float32 Grams, all "
          "materialised | Grams | largest normalised error: unchunked / 32768 / 4096 columns | smallest "
          "lambda_min (10% quantile) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for config in args.config or ["harness", "qwen128"]:
        r, e = gain(config, args.repeats), gram_errors(config)
        err = " / ".join(f"{v:.1e} ({v / eps:.1f} eps32)" for v in e["errors"].values())
        lam = "-" if e["lam_min"] is None else f"{e['lam_min'][0]:.3f} ({e['lam_min'][1]:.3f})"
        print(f"| {config} | {r['float64 Grams']:.2f}x | {r['float32 Grams']:.2f}x | "
              f"{r['float32 Grams, all materialised']:.2f}x | {e['grams']} | {err} | {lam} |")


if __name__ == "__main__":
    main()
