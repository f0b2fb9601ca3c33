"""Where intra-PROMA's extra step time goes: the subspace search against the rest of the intra pipeline.

Usage::

    PYTHONPATH=. python benchmarks/bench_intra_parts.py                  # qwen128 and harness
    PYTHONPATH=. python benchmarks/bench_intra_parts.py --config qwen128 --repeats 7

Steps of :mod:`bench_targets`' configurations (``zero_grad`` + 4 x (forward + ``acc.backward``), rank 1,
two-sided), timed as there (minimum wall-clock time over interleaved repetitions after a warm-up, ratio to
``variant="none"`` in the same process), in four versions:

- ``plain``: ``variant="none"``;
- ``intra``: as shipped (top singular vectors of D and X by block Lanczos in torch
  (:mod:`proma.subspace`) for Grams of side above ``DENSE_EIGH_MAX``, dense ``eigh`` below);
- ``intra, dense eigh``: every subspace from a dense ``eigh`` of the formed Gram (the other exact route);
- ``intra, no subspace search``: the subspace search replaced by an empty subspace, so the update is the plain
  microbatch gradient formed from the captured factors. Not a method: it is the floor of the intra pipeline
  (capture, pg from the factors, float64 bookkeeping) that no faster eigen-solver can remove.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

import proma.subspace as subspace
import proma.updates as updates
from proma.subspace import Subspace
from bench_targets import alone, build, step_fn, time_steps  # noqa: E402  (benchmarks/ is the script's directory)

VERSIONS = ("plain", "intra", "intra, dense eigh", "intra, no subspace search")
NO_LANCZOS = 10 ** 9


def _empty_subspace(M: torch.Tensor, rank: int, row_mask=None) -> Subspace:
    zero = torch.zeros(M.shape[1], rank, dtype=torch.float64, device=M.device)
    return Subspace(V=zero, used=torch.zeros(rank, dtype=torch.bool), residual=torch.zeros(rank))


@contextlib.contextmanager
def patched(version: str):
    """Swap the subspace search of :mod:`proma.updates` for the duration of one step."""
    saved = subspace.DENSE_EIGH_MAX, updates.dominant_subspace
    if version == "intra, dense eigh":
        subspace.DENSE_EIGH_MAX = NO_LANCZOS
    elif version == "intra, no subspace search":
        updates.dominant_subspace = _empty_subspace
    try:
        yield
    finally:
        subspace.DENSE_EIGH_MAX, updates.dominant_subspace = saved


def _in_version(version: str, step):
    def run():
        with patched(version):
            step()
    return run


def time_versions(config: str, repeats: int) -> dict:
    """Minimum wall seconds per step of every version (interleaved, one warm-up step each)."""
    model, batches, forward = build(config)
    made = {v: step_fn("plain" if v == "plain" else "intra", model, batches, forward) for v in VERSIONS}
    steps = alone({v: (_in_version(v, step), acc) for v, (step, acc) in made.items()})
    return time_steps(steps, repeats)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", choices=("qwen128", "qwen64", "harness"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, min of {args.repeats} interleaved steps after a warm-up; "
          "wall clock as a ratio to plain in the same process")
    print("| configuration | " + " | ".join(f"{v} x plain" for v in VERSIONS[1:]) + " | plain step (ms) |")
    print("|---|" + "---:|" * len(VERSIONS))
    for config in args.config or ["qwen128", "harness"]:
        cpu = time_versions(config, args.repeats)
        print(f"| {config} | " + " | ".join(f"{cpu[v] / cpu['plain']:.2f}" for v in VERSIONS[1:])
              + f" | {1e3 * cpu['plain']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
