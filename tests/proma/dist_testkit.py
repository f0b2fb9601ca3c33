"""Data and oracles of the multi-process tests: every rank builds every rank's microbatches from one seed, and
rank 0 computes the expected gradient from per-sequence autograd gradients and ``reference.accumulate``.

Convention under test (see ``proma.accumulator``): every mode gives the mean over the W ranks, so
``sync="global"`` equals ``reference.accumulate`` on the union microbatches with weights w / W, and "local",
"intra" and "none" equal the mean of the per-rank single-process results.

The multi-process machinery is here too: :func:`spawn_scenarios` runs one ``mp.spawn`` of W ranks over a test
module's ``SCENARIOS`` (spawning costs seconds) and returns each rank's JSON results; :func:`ok` and
:func:`expect_error` read and record them.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reference
from verification.testkit import per_sequence_grads, pin_threads, qwen_seq_logp, trainable

from proma_testkit import intra_microbatch_oracle

WORLD = 2
# a timeout turns a mismatched collective into an error instead of a hung test run
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# the gloo rendezvous file each spawned group creates in its test's output folder
RENDEZVOUS_FILE = "rendezvous"


def qwen_batches(seed=1, sizes=((2, 1), (1, 2)), tokens=(6, 8), vocab=50):
    """[rank][k] = ((ids, mask), w): ragged right-padded sequences, float64 weights."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, row in enumerate(sizes):
        mine = []
        for b in row:
            ids = torch.randint(0, vocab, (b, tokens[r]), generator=gen)
            lengths = torch.randint(2, tokens[r] + 1, (b,), generator=gen)
            mask = (torch.arange(tokens[r])[None, :] < lengths[:, None]).long()
            mine.append(((ids, mask), torch.randn(b, generator=gen, dtype=torch.float64)))
        out.append(mine)
    return out


def qwen_forward(model, batch):
    return qwen_seq_logp(model, *batch)


def ref_opts(acc_kwargs):
    """``reference.accumulate`` options of accumulator keywords (solver "none" for variants other than proma)."""
    opts = {k: acc_kwargs[k] for k in ("passes", "ridge", "relative_bound", "shrinkage") if k in acc_kwargs}
    opts["solver"] = acc_kwargs.get("solver", "exact") if acc_kwargs.get("variant", "proma") == "proma" else "none"
    return opts


def seq_grads(model, forward, batch, params):
    """(b, P) per-sequence gradients of ``forward(model, batch)`` by autograd."""
    return per_sequence_grads(model, forward(model, batch), params)


def oracle_global(model, forward, batches, opts):
    """reference.accumulate on the union of every rank's k-th microbatch, weights / W (empty ones left out)."""
    params = trainable(model)
    mbs = []
    for k in range(len(batches[0])):
        rows = [(seq_grads(model, forward, batches[r][k][0], params), batches[r][k][1].numpy())
                for r in range(WORLD) if batches[r][k][1].numel()]
        mbs.append((np.vstack([g for g, _ in rows]), np.concatenate([w for _, w in rows]) / WORLD))
    return reference.accumulate(mbs, blocks=[p.numel() for _, p in params], **opts)


def oracle_local(model, forward, batches, opts):
    """Mean over ranks of reference.accumulate on each rank's own microbatches."""
    params = trainable(model)
    total = 0.0
    for r in range(WORLD):
        mbs = [(seq_grads(model, forward, batch, params), w.numpy()) for batch, w in batches[r] if w.numel()]
        total = total + reference.accumulate(mbs, blocks=[p.numel() for _, p in params], **opts)
    return total / WORLD


def oracle_intra(model, forward, batches, acc_kwargs):
    """Mean over ranks of single-process intra: reference.intra_project per microbatch and Linear weight."""
    params = trainable(model)
    total = 0.0
    for r in range(WORLD):
        for batch, w in batches[r]:
            if w.numel():
                seq = seq_grads(model, forward, batch, params)
                total = total + intra_microbatch_oracle(model, forward, batch, params, seq, w.numpy(), acc_kwargs)
    return total / WORLD


def with_plain(model, forward, batches, flat, names):
    """Excluded parameters get plain accumulation: their block of ``flat`` becomes the mean over ranks of
    sum_i w_i g_i (``flat`` is changed in place and returned; unchanged when ``names`` is empty)."""
    if not names:
        return flat
    plain = oracle_local(model, forward, batches, {"solver": "none"})
    start = 0
    for name, p in trainable(model):
        if name in names:
            flat[start:start + p.numel()] = plain[start:start + p.numel()]
        start += p.numel()
    return flat


def oracle(model, forward, batches, acc_kwargs):
    """The expected flat gradient of accumulator keywords ``acc_kwargs``: intra, global (excluded parameters
    plain) or local/none."""
    if acc_kwargs["variant"] == "intra":
        return oracle_intra(model, forward, batches, acc_kwargs)
    if acc_kwargs.get("sync") == "global":
        return with_plain(model, forward, batches, oracle_global(model, forward, batches, ref_opts(acc_kwargs)),
                          acc_kwargs.get("exclude", ()))
    return oracle_local(model, forward, batches, ref_opts(acc_kwargs))


# -- running scenarios on W processes ----------------------------------------------------------------------

def expect_error(fn):
    """Run ``fn``; {"raised": exception class name or None, "message": its text}."""
    try:
        fn()
    except ValueError as exc:
        return {"raised": "ValueError", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001  (recorded: the test says which exception came)
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def _worker(rank, module, outdir):
    """One rank: every scenario of ``module.SCENARIOS`` ({name: fn(rank) -> JSON-able}) in order, a barrier
    after each; results (or the traceback of a crash) go to ``outdir/rank{rank}.json``."""
    pin_threads()
    scenarios = importlib.import_module(module).SCENARIOS  # closures do not pickle: the child looks them up
    # a file rendezvous in the test's own folder: no TCP port to race for with other tests' process groups
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, RENDEZVOUS_FILE)}", rank=rank,
                            world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    results = {}
    try:
        for name, fn in scenarios.items():
            try:
                results[name] = fn(rank)
            except Exception:  # noqa: BLE001  (the test reports it; later scenarios still run)
                results[name] = {"crashed": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def spawn_scenarios(module, outdir):
    """Run the ``SCENARIOS`` of the test module named ``module`` on W gloo ranks; [rank] = {name: result}."""
    mp.spawn(_worker, args=(module, str(outdir)), nprocs=WORLD, join=True)
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def ok(results, name):
    """(rank 0's, rank 1's) result of scenario ``name``, after asserting that no rank crashed in it."""
    for r in range(WORLD):
        assert "crashed" not in results[r][name], f"rank {r}:\n{results[r][name].get('crashed')}"
    return results[0][name], results[1][name]
