"""Projection error on real microbatches: torch vs reference, published approximations vs exact, layer-wise
vs global, and the intra variant.

Index conventions: b sequences of a microbatch, P total parameter size, P_k the size of parameter tensor k.

On a run's real microbatches (the policy and rollout of a training run), the per-sequence gradients g_i of
every parameter are computed by brute force (b backward passes of a float64 copy of the policy) and the NumPy
reference accumulates them under each setting, microbatch by microbatch. Reported per setting:

- ``rel_dist``: ``||G - G_exact|| / ||G_exact||`` after the last microbatch, G_exact the exact layer-wise result;
- ``overlap``: the residual overlap ``max_i |g_i . G'| / (||g_i|| ||G'||)`` of the projected running gradient
  ``G' = G_m - pg_m`` with microbatch m's sequences (max over microbatches m >= 1), over the whole parameter
  vector (``overlap_global``) and block by block (``overlap_layer``, max over parameter tensors);
- ``conditioning``: the smallest relative singular value of each tensor's g_i per microbatch (above the
  float64 cutoff), and the fraction of (tensor, microbatch) pairs with one below the float32 rank cutoff of
  the torch exact solver (a Gram formed in float32 cannot resolve such directions, so it drops them);
- for the intra variant, the fraction of each microbatch gradient it removes and its distance from plain
  accumulation and from exact PROMA.

``ProjectedAccumulator`` (float64 and float32 copies of the policy, the accumulator's own hooks on the real
model) is run on the same microbatches for each solver; its ``p.grad`` after every microbatch is compared
with the reference state, per parameter tensor, with the oracle's scale ``max(||G_out||, ||G_in||, ||pg||)``.
"""
from __future__ import annotations

import copy
import math

import numpy as np

import reference
from proma.intra import ROUNDED_ZERO_EPS
from proma.options import PUBLISHED_SETTINGS

from ..oracle.model_case import linear_factors, linear_weight_owners, per_sequence_grads, trainable_parameters

# name -> (reference.accumulate_step keyword arguments, layer-wise?)
REFERENCE_SETTINGS = {
    "exact (layer-wise)": (dict(solver="exact"), True),
    "exact (global)": (dict(solver="exact"), False),
    "gram_schmidt, 1 pass": (dict(solver="gram_schmidt", passes=1), True),
    "gram_schmidt, 2 passes": (dict(solver="gram_schmidt", passes=2), True),
    "gram_schmidt, 4 passes": (dict(solver="gram_schmidt", passes=4), True),
    "ridge 1e-2": (dict(solver="ridge", ridge=1e-2), True),
    "exact, relative_bound 0.5": (dict(solver="exact", relative_bound=0.5), True),
    "paper: gram_schmidt 2, bound 0.5": (
        {k: v for k, v in PUBLISHED_SETTINGS.items() if k != "variant"}, True),
    "none (plain accumulation)": (dict(solver="none"), True),
}
EXACT = "exact (layer-wise)"
# name -> (ProjectedAccumulator keyword arguments, reference setting name or ("intra", rank, form))
TORCH_SETTINGS = {
    "none": (dict(variant="none"), "none (plain accumulation)"),
    "exact": (dict(variant="proma", solver="exact"), EXACT),
    "gram_schmidt (2 passes)": (dict(variant="proma", solver="gram_schmidt", passes=2), "gram_schmidt, 2 passes"),
    "ridge 1e-2": (dict(variant="proma", solver="ridge", ridge=1e-2), "ridge 1e-2"),
    "paper (gram_schmidt 2, bound 0.5)": (
        dict(PUBLISHED_SETTINGS), "paper: gram_schmidt 2, bound 0.5"),
    "intra (two_sided, rank 1)": (dict(variant="intra", intra_rank=1, intra_form="two_sided"),
                                  ("intra", 1, "two_sided")),
}



def add_declared_solvers(reference_settings: dict, torch_settings: dict) -> None:
    """One row per declared solver (``reference.solvers``) that the tables above do not name, at its
    declaration's example options (in place; run at import for the solvers declared by then)."""
    for name in reference.solver_names():
        if any(kw.get("solver") == name for kw, _ in reference_settings.values()):
            continue
        kw = dict(solver=name, **reference.declaration(name).example)
        reference_settings[f"{name} (declared)"] = (kw, True)
        torch_settings[f"{name} (declared)"] = (dict(kw, variant="proma"), f"{name} (declared)")


add_declared_solvers(REFERENCE_SETTINGS, TORCH_SETTINGS)

# Parameter count P at which the float32 cutoff is quoted: any tensor size of a real model, where the float32
# rounding term of the cutoff, not the size term, sets it.
CUTOFF_TENSOR_SIZE = 10**9


def float32_cutoff(b: int) -> float:
    """Relative singular value below which the torch exact solver, given b float32 sequence gradients, drops a
    direction: sqrt of ``proma.solvers.eigen_cutoff`` (its documented rank rule) for a large tensor."""
    import torch

    from proma.solvers import eigen_cutoff

    return math.sqrt(eigen_cutoff(b, CUTOFF_TENSOR_SIZE, torch.float32))


def _overlaps(g: np.ndarray, v: np.ndarray, blocks: list) -> tuple:
    glob = reference.residual_overlap(g, v)
    per = max((reference.residual_overlap(g[:, blk], v[blk]) for blk in blocks), default=0.0)
    return glob, per


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else (0.0 if not np.any(a) else math.inf)


def projection_study(model, seq_logp_fn, batches, weights, *, intra_ranks=(1, 2, 4), torch_dtypes=("float64", "float32"),
                     progress=True) -> dict:
    """Run every setting on the microbatches ``batches`` with weights ``weights``; returns a JSON-able dict.

    Parameters
    ----------
    model : torch.nn.Module
        The policy as trained (left untouched; copies are made).
    seq_logp_fn : callable ``(model, batch) -> (b,)``
    batches : list of sequence batches (one per microbatch); weights : list of (b_m,) arrays
    """
    from tqdm.auto import tqdm

    model64 = copy.deepcopy(model).double().eval()
    named = trainable_parameters(model64)
    sizes = [p.numel() for _, p in named]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    blocks = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    P = int(edges[-1])
    owners = linear_weight_owners(model64)

    G = {name: np.zeros(P) for name in REFERENCE_SETTINGS}
    track = {name: {"overlap_global": 0.0, "overlap_layer": 0.0, "removed_frac": []} for name in REFERENCE_SETTINGS}
    G_intra = {(r, f): np.zeros(P) for r in intra_ranks for f in ("two_sided", "kron")}
    intra_removed = {key: [] for key in G_intra}
    plain_total = np.zeros(P)

    runs = _torch_runs(model, torch_dtypes)  # one model copy and accumulator each, alive across the microbatches

    smallest = {}  # (m, k) -> smallest relative singular value of the tensor's g_i above the float64 cutoff
    bar = tqdm(total=len(batches), desc="projection study", unit="mb", disable=not progress, leave=False)
    try:
        for m, (batch, w) in enumerate(zip(batches, weights)):
            w = np.asarray(w, dtype=np.float64)
            per_param = per_sequence_grads(model64, seq_logp_fn, batch, [p for _, p in named])
            b = len(w)
            g = np.concatenate([x.reshape(b, -1) for x in per_param], axis=1)
            del per_param
            pg = w @ g
            plain_total += pg
            for k, blk in enumerate(blocks):
                smallest[m, k] = _smallest_rel_sv(g[:, blk])
            states = _reference_step(G, track, g, w, blocks, first=m == 0)
            subspaces = _intra_subspaces(model64, seq_logp_fn, batch, named, owners, max(intra_ranks))
            intra_states = _intra_step(G_intra, intra_removed, pg, subspaces, blocks, named)
            # torch on the same microbatch
            for run in runs:
                ref = run["ref"]
                if isinstance(ref, tuple):
                    expected = intra_states[ref[1:]]
                else:
                    expected = (states[ref].before, states[ref].pg, states[ref].after)
                _torch_microbatch(run, seq_logp_fn, batch, w, expected, m, blocks, named, smallest)
            bar.update(1)
    finally:
        bar.close()
        for run in runs:
            run["acc"].close()

    return _results(batches, weights, named, P, G, track, G_intra, intra_removed, plain_total, runs, smallest)


def _torch_runs(model, torch_dtypes) -> list[dict]:
    """One model copy (in each dtype) and one accumulator per :data:`TORCH_SETTINGS` entry."""
    import torch

    from proma import ProjectedAccumulator

    runs = []
    for dtype in torch_dtypes:
        tdtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
        for label, (kwargs, ref_name) in TORCH_SETTINGS.items():
            m_copy = copy.deepcopy(model).to(tdtype).eval()
            acc = ProjectedAccumulator(m_copy, **kwargs)
            acc.zero_grad()
            runs.append({"dtype": dtype, "label": label, "model": m_copy, "acc": acc, "ref": ref_name,
                         "params": [p for _, p in trainable_parameters(m_copy)], "max_rel_err": 0.0, "worst": ""})
    return runs


def _reference_step(G: dict, track: dict, g: np.ndarray, w: np.ndarray, blocks: list, *, first: bool) -> dict:
    """Every :data:`REFERENCE_SETTINGS` entry on one microbatch: updates ``G`` and ``track`` in place.

    ``g`` (b, P) float64 sequence gradients, ``w`` (b,) weights; returns ``{setting: reference step}``.
    """
    states = {}
    for name, (kw, layerwise) in REFERENCE_SETTINGS.items():
        step = reference.accumulate_step(G[name], g, w, blocks=blocks if layerwise else None, **kw)
        if not first:
            og, ol = _overlaps(g, step.after - step.pg, blocks)
            track[name]["overlap_global"] = max(track[name]["overlap_global"], og)
            track[name]["overlap_layer"] = max(track[name]["overlap_layer"], ol)
            nin = np.linalg.norm(step.before)
            track[name]["removed_frac"].append(float(np.linalg.norm(step.removed) / nin) if nin > 0 else 0.0)
        states[name] = step
        G[name] = step.after
    return states


def _intra_step(G_intra: dict, removed: dict, pg: np.ndarray, subspaces, blocks: list, named) -> dict:
    """Every (rank, form) of the intra variant on one microbatch; updates ``G_intra`` and ``removed`` in place.

    Returns ``{(rank, form): (G before, pg, G after)}``; removed fraction = ||pg - new|| / ||pg||.
    """
    states = {}
    npg = np.linalg.norm(pg)
    for key in G_intra:
        new = _intra_update(pg, subspaces, blocks, named, *key)
        removed[key].append(float(np.linalg.norm(pg - new) / npg) if npg > 0 else 0.0)
        states[key] = (G_intra[key].copy(), pg, G_intra[key] + new)
        G_intra[key] = G_intra[key] + new
    return states


def _smallest_rel_sv(g: np.ndarray) -> float:
    """Smallest singular value of the (b, n) sequence gradients ``g`` above the float64 cutoff, relative to the
    largest (NaN when none is)."""
    sv = np.linalg.svd(g, compute_uv=False)
    keep = sv > reference.default_rcond(*g.shape) * sv[0] if sv.size and sv[0] > 0 else sv[:0] > 0
    return float(sv[keep][-1] / sv[0]) if np.any(keep) else math.nan


def _intra_subspaces(model64, seq_logp_fn, batch, named, owners, rank: int) -> dict:
    """Tensor index -> (U, V) of ``reference.intra_subspaces`` for every ``nn.Linear``-only weight (the tokens
    that carry gradient chosen by ``reference.gradient_rows``); the rank-r subspaces are the first r columns."""
    _, factors = linear_factors(model64, seq_logp_fn, batch, batch["attention_mask"])
    subspaces = {}
    for k, (_, p) in enumerate(named):
        calls = factors.get(id(p))
        if not calls or owners.get(id(p), True):
            continue
        X = np.concatenate([c[0] for c in calls])
        D = np.concatenate([c[1] for c in calls])
        subspaces[k] = reference.intra_subspaces(X, D, rank=rank)
    return subspaces


def _intra_update(pg, subspaces, blocks, named, rank: int, form: str) -> np.ndarray:
    """The microbatch gradient ``pg`` (P,) with its linear weights' blocks intra-projected at ``rank``."""
    new = pg.copy()
    for k, (U, V) in subspaces.items():
        new[blocks[k]] = reference.intra_apply(pg[blocks[k]].reshape(named[k][1].shape), U[:, :rank],
                                               V[:, :rank], form=form).ravel()
    return new


def _torch_microbatch(run, seq_logp_fn, batch, w, expected, m, blocks, named, smallest) -> None:
    """One microbatch through ``run``'s accumulator; p.grad per tensor against the reference's
    ``expected = (before, pg, after)``, keeping the worst relative error in ``run``."""
    import torch

    before, pg_ref, after = expected
    tdtype = next(run["model"].parameters()).dtype
    run["acc"].backward(seq_logp_fn(run["model"], batch), torch.as_tensor(w, dtype=tdtype))
    for k, p in enumerate(run["params"]):
        blk = blocks[k]
        got = np.zeros(p.numel()) if p.grad is None else p.grad.detach().double().cpu().numpy().ravel()
        scale = max(np.linalg.norm(after[blk]), np.linalg.norm(before[blk]), np.linalg.norm(pg_ref[blk]))
        err = float(np.linalg.norm(got - after[blk]) / scale) if scale > 0 else float(np.linalg.norm(got))
        if err > run["max_rel_err"]:
            run["max_rel_err"], run["worst"] = err, f"mb{m} {named[k][0]}"
            run["worst_smallest_sv"] = smallest[m, k]


def _results(batches, weights, named, P, G, track, G_intra, intra_removed, plain_total, runs, smallest) -> dict:
    """The study's JSON-able summary (see ``projection_study``)."""
    exact = G[EXACT]
    out = {
        "n_microbatches": len(batches), "sequences": [len(w) for w in weights], "n_parameters": P,
        "n_tensors": len(named), "plain_vs_exact_rel_dist": _rel(plain_total, exact),
        "settings": {}, "intra": {}, "torch_vs_reference": [],
        # the token-row rule intra's float32 run used (reports older than it lack the key: every non-zero row)
        "intra_row_cut_eps32": ROUNDED_ZERO_EPS,
    }
    for name in REFERENCE_SETTINGS:
        fr = track[name]["removed_frac"]
        out["settings"][name] = {
            "rel_dist_to_exact": _rel(G[name], exact), "overlap_global": track[name]["overlap_global"],
            "overlap_layer": track[name]["overlap_layer"],
            "removed_frac_mean": float(np.mean(fr)) if fr else math.nan,
        }
    for (rank, form), Gi in G_intra.items():
        out["intra"][f"{form}, rank {rank}"] = {
            "rank": rank, "form": form, "removed_frac_mean": float(np.mean(intra_removed[(rank, form)])),
            "rel_dist_to_plain": _rel(Gi, plain_total), "rel_dist_to_exact": _rel(Gi, exact),
        }
    for run in runs:
        out["torch_vs_reference"].append({"setting": run["label"], "dtype": run["dtype"],
                                          "max_rel_err": run["max_rel_err"], "worst": run["worst"],
                                          "worst_smallest_rel_sv": run.get("worst_smallest_sv", math.nan)})
    sv = np.array([v for v in smallest.values() if math.isfinite(v)])
    cut32 = float32_cutoff(max(len(w) for w in weights))
    out["conditioning"] = {
        "min_rel_sv": float(sv.min()) if sv.size else math.nan,
        "float32_cutoff_rel_sv": cut32,
        "frac_below_float32_cutoff": float(np.mean(sv < cut32)) if sv.size and math.isfinite(cut32) else math.nan,
        "n_blocks": int(sv.size),
    }
    return out
