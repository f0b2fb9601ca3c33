"""This project's implementations as oracle callables ``fn(case) -> outputs[m][k]``.

- :func:`run_reference`: the NumPy reference recomputed from the case's stored factors (a round trip of
  the files; it is how the expected arrays were made).
- :func:`run_reference_step`, :func:`run_torch_step`: the same, one microbatch at a time from the stored
  ``G_in`` (``proma-verify check --step``).
- :func:`run_torch`: ``proma.ProjectedAccumulator`` on a *replay model* that reproduces the case's factors
  exactly, through the accumulator's public API and its own hooks (nothing is fed to its internals).

The replay model, per layer (one ``nn.Parameter`` of the layer's shape, shared by all its uses):

- a ``"linear"`` use is an ``nn.Linear(i, o, bias=False)`` applied to the case's ``X`` laid out
  (b, T, i) (zero-padded per sequence), and the microbatch's sequence log-probabilities are built as
  ``seq_logp_j += sum_t <Y_jt, D_jt>``, so the output gradient of one backward of ``seq_logp.sum()`` is
  exactly ``D`` and the accumulator's hooks capture exactly ``(X, D)``;
- a ``"dense"`` use of a 2-D (o, i) parameter is an ``nn.Embedding(o, i)`` looked up at ids 0..o-1 in every
  sequence with ``seq_logp_j += <E, seq_grads_j>``; of any other parameter, an ``nn.RMSNorm(P, eps=0)`` on
  an input of ones (so its normalised input is exactly 1) with ``seq_logp_j += <w, seq_grads_j>``. Either
  way sequence j's gradient of that use is exactly ``seq_grads_j``.
"""
from __future__ import annotations

import numpy as np

import reference

from .expected import layer_factors, layer_seq_grads, microbatch_seq_grads, reference_history, split_flat
from .format import Case


def run_reference(case: Case) -> list:
    """Outputs of the NumPy reference on ``case`` (recomputed from its factors)."""
    return [record["G_out"] for record in reference_history(case)]


def run_reference_step(case: Case, m: int, G_in: list) -> list:
    """One microbatch of the NumPy reference from the running gradient ``G_in`` (per-layer arrays)."""
    s, layers = case.settings, case.layers
    w = case.weights(m)
    if s.variant == "intra":
        out = []
        for k, G in enumerate(G_in):
            pg = np.tensordot(w, layer_seq_grads(case, m, k), axes=1)
            factors = layer_factors(case, m, k)
            out.append(G + (pg if factors is None else reference.intra_project(
                pg, *factors, rank=s.intra_rank, form=s.intra_form)))
        return out
    step = reference.accumulate_step(
        np.concatenate([np.ravel(G) for G in G_in]), microbatch_seq_grads(case, m), w,
        blocks=[layer.size for layer in layers], solver="none" if s.variant == "none" else s.solver,
        passes=s.passes, ridge=s.ridge, relative_bound=s.relative_bound, shrinkage=s.shrinkage)
    return split_flat(step.after, layers)


def _pad_tokens(X: np.ndarray, seq: np.ndarray, b: int):
    """Lay out token rows (t, f) as (b, T, f), zero-padded; T = most tokens of any sequence."""
    counts = np.bincount(seq, minlength=b) if len(seq) else np.zeros(b, dtype=np.int64)
    T = int(counts.max()) if b else 0
    out = np.zeros((b, T, X.shape[1]))
    pos = np.zeros(len(seq), dtype=np.int64)
    seen = np.zeros(b, dtype=np.int64)
    for r, j in enumerate(seq):  # token order within a sequence is irrelevant to its gradient
        pos[r] = seen[j]
        seen[j] += 1
    out[seq, pos] = X
    return out


def build_replay_model(case: Case, dtype=None):
    """An ``nn.Module`` whose ``forward(case, m)`` returns seq_logp (b_m,) reproducing case's factors."""
    import torch
    from torch import nn

    dtype = dtype or torch.float64

    class ReplayModel(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.uses = nn.ModuleDict()
            for k, layer in enumerate(case.layers):
                linear_shaped = "linear" in layer.uses or len(layer.shape) == 2
                shape = layer.shape if linear_shaped else (layer.size,)
                param = nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype))
                for u, kind in enumerate(layer.uses):
                    if kind == "linear":
                        mod = nn.Linear(layer.shape[1], layer.shape[0], bias=False, dtype=dtype)
                    elif linear_shaped:
                        mod = nn.Embedding(layer.shape[0], layer.shape[1], dtype=dtype)
                    else:
                        mod = nn.RMSNorm(layer.size, eps=0.0, dtype=dtype)
                    mod.weight = param  # every use shares the layer's one parameter
                    self.uses[f"layer{k}_use{u}"] = mod

        def layer_parameter(self, k: int):
            return self.uses[f"layer{k}_use0"].weight

        def forward(self, case: Case, m: int):
            b = case.batch_size(m)
            seq_logp = torch.zeros(b, dtype=dtype)
            for k, layer in enumerate(case.layers):
                for u, kind in enumerate(layer.uses):
                    mod, arrays = self.uses[f"layer{k}_use{u}"], case.use(m, k, u)
                    if kind == "linear":
                        X = torch.as_tensor(_pad_tokens(arrays["X"], arrays["seq"], b), dtype=dtype)
                        D = torch.as_tensor(_pad_tokens(arrays["D"], arrays["seq"], b), dtype=dtype)
                        seq_logp = seq_logp + (mod(X) * D).sum(dim=(1, 2))
                    elif isinstance(mod, nn.Embedding):
                        ids = torch.arange(layer.shape[0]).expand(b, -1)
                        g = torch.as_tensor(arrays["seq_grads"], dtype=dtype)
                        seq_logp = seq_logp + (mod(ids) * g).sum(dim=(1, 2))
                    else:
                        ones = torch.ones(b, 1, layer.size, dtype=dtype)
                        g = torch.as_tensor(arrays["seq_grads"].reshape(b, 1, layer.size), dtype=dtype)
                        seq_logp = seq_logp + (mod(ones) * g).sum(dim=(1, 2))
            return seq_logp

    return ReplayModel()


def accumulator_kwargs(settings) -> dict:
    """``ProjectedAccumulator`` keyword arguments for a case's settings."""
    return dict(variant=settings.variant, solver=settings.solver, passes=settings.passes, ridge=settings.ridge,
                relative_bound=settings.relative_bound, shrinkage=settings.shrinkage,
                intra_rank=settings.intra_rank, intra_form=settings.intra_form)


def run_torch(case: Case, *, dtype="float64", strategy="auto", start=None) -> list:
    """Outputs of ``proma.ProjectedAccumulator`` on the case's replay model (float64 or float32).

    ``start``: optional ``start(m) -> per-layer arrays`` written to ``p.grad`` before microbatch m (the
    accumulator takes an existing ``p.grad`` as its running gradient): step mode.
    """
    import torch

    from proma import ProjectedAccumulator

    tdtype = {"float64": torch.float64, "float32": torch.float32}[str(dtype).replace("torch.", "")]
    model = build_replay_model(case, tdtype)
    outputs = []
    with ProjectedAccumulator(model, strategy=strategy, **accumulator_kwargs(case.settings)) as acc:
        acc.zero_grad()
        for m in range(case.n_microbatches):
            if start is not None:
                for k, G in enumerate(start(m)):
                    p = model.layer_parameter(k)
                    p.grad = torch.as_tensor(np.asarray(G).reshape(p.shape), dtype=tdtype).clone()
            seq_logp = model(case, m)
            acc.backward(seq_logp, torch.as_tensor(case.weights(m), dtype=tdtype))
            per_layer = []
            for k, layer in enumerate(case.layers):
                grad = model.layer_parameter(k).grad
                per_layer.append(np.zeros(layer.shape, dtype=np.dtype(str(tdtype).replace("torch.", "")))
                                 if grad is None else grad.detach().cpu().numpy().reshape(layer.shape).copy())
            outputs.append(per_layer)
    return outputs


IMPLEMENTATIONS = {
    "reference": run_reference,
    "torch": run_torch,
    "torch-float32": lambda case: run_torch(case, dtype="float32"),
}


def run_torch_step(case: Case, m: int, G_in: list, *, dtype="float64") -> list:
    """Microbatch m of ``proma.ProjectedAccumulator`` started from ``G_in`` (step mode)."""
    sub = Case(case.id, case.description, case.settings, case.layers, [0, case.batch_size(m)],
               {key.replace(f"mb{m}/", "mb0/", 1): a for key, a in case.arrays.items() if key.startswith(f"mb{m}/")})
    return run_torch(sub, dtype=dtype, start=lambda _: G_in)[0]


STEP_IMPLEMENTATIONS = {
    "reference": run_reference_step,
    "torch": run_torch_step,
    "torch-float32": lambda case, m, G_in: run_torch_step(case, m, G_in, dtype="float32"),
}
