"""Cross-check ProjectedAccumulator against the reference on a GPU (or any device), then exit non-zero on failure.

Usage: ``python benchmarks/check_device.py --device cuda``. Runs the tiny tied-embedding Qwen3 of the test
suite on the device in float64 and float32 for every variant / solver / strategy, with per-sequence
gradients from autograd as the oracle (as ``tests/proma/test_proma_accumulator.py`` does on CPU).
"""
from __future__ import annotations

import argparse
import sys

import torch

import reference
from proma import ProjectedAccumulator
from verification.testkit import (GENERIC_PERTURBATION, flat_grad, per_sequence_grads, qwen_seq_logp,
                                  rel_err, tiny_qwen3, trainable)

CASES = [
    (torch.float64, dict(solver="exact"), 1e-9),
    (torch.float64, dict(solver="exact", strategy="ghost"), 1e-9),
    (torch.float64, dict(solver="gram_schmidt", relative_bound=0.5), 1e-9),
    (torch.float64, dict(solver="ridge", shrinkage=0.5), 1e-9),
    (torch.float32, dict(solver="exact"), 1e-4),
    (torch.float32, dict(solver="gram_schmidt", strategy="ghost"), 1e-4),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    dev = torch.device(ap.parse_args().device)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for k, b in enumerate([3, 2, 4]):
        ids = torch.randint(0, 50, (b, 7), generator=gen)
        lengths = torch.randint(2, 8, (b,), generator=gen)
        mask = (torch.arange(7)[None] < lengths[:, None]).long()
        if k == 1:
            ids[1], mask[1] = ids[0], mask[0]
        batches.append((ids.to(dev), mask.to(dev), torch.randn(b, generator=gen, dtype=torch.float64)))
    failed = 0
    for dtype, kwargs, tol in CASES:
        model = tiny_qwen3(dtype, perturb=GENERIC_PERTURBATION).to(dev)
        params = trainable(model)
        oracle = []
        with ProjectedAccumulator(model, **kwargs) as acc:
            acc.zero_grad()
            for ids, mask, w in batches:
                with acc.paused():
                    lp = qwen_seq_logp(model, ids, mask)
                    oracle.append((per_sequence_grads(model, lp, params), w.numpy()))
                acc.backward(qwen_seq_logp(model, ids, mask), w.to(dev))
        got = flat_grad([(n, _cpu(p)) for n, p in params])
        rcond = None if dtype == torch.float64 else 1e-5
        want = reference.accumulate(oracle, blocks=[p.numel() for _, p in params],
                                    solver=kwargs.get("solver", "exact"), rcond=rcond,
                                    **{k: v for k, v in kwargs.items() if k in ("relative_bound", "shrinkage")})
        err = rel_err(got, want)
        ok = err <= tol
        failed += not ok
        print(f"{dev} {dtype} {kwargs}: rel err {err:.2e} (tol {tol:g}) {'ok' if ok else 'FAIL'}", flush=True)
    sys.exit(1 if failed else 0)


class _cpu:
    """Parameter view whose .grad is on the CPU (flat_grad reads .grad and .numel())."""

    def __init__(self, p):
        self.grad = None if p.grad is None else p.grad.detach().cpu()
        self._n = p.numel()

    def numel(self):
        return self._n


if __name__ == "__main__":
    main()
