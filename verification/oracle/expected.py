"""Expected values of an oracle case from the NumPy reference: per-sequence gradients, factors and the running
gradient of every microbatch and layer.

Index conventions: b sequences of a microbatch, t tokens, i in-features, o out-features, P parameter size.
A case's per-sequence gradient of layer k in microbatch m is the sum over the layer's uses (FORMAT.md):
``g_j = sum_{t in j} D_t^T X_t`` for a linear use, ``seq_grads[j]`` for a dense use.
"""
from __future__ import annotations

import numpy as np

import reference

from .format import Case, layer_key


def layer_seq_grads(case: Case, m: int, k: int) -> np.ndarray:
    """Per-sequence gradients of layer k in microbatch m, shape (b_m, *layer.shape): the sum over uses."""
    layer, b = case.layers[k], case.batch_size(m)
    total = np.zeros((b, *layer.shape))
    for u, kind in enumerate(layer.uses):
        arrays = case.use(m, k, u)
        if kind == "linear":
            total += reference.linear_seq_grads(arrays["X"], arrays["D"], arrays["seq"], b)
        else:
            total += arrays["seq_grads"]
    return total


def microbatch_seq_grads(case: Case, m: int) -> np.ndarray:
    """All layers' per-sequence gradients of microbatch m, flattened and concatenated: (b_m, sum_k P_k)."""
    b = case.batch_size(m)
    return np.concatenate([layer_seq_grads(case, m, k).reshape(b, -1) for k in range(len(case.layers))], axis=1)


def layer_factors(case: Case, m: int, k: int):
    """Intra-variant factors of layer k: the tokens of every linear use stacked, ``X`` (t, i), ``D`` (t, o)
    (the rows that carry gradient are chosen by :func:`reference.gradient_rows`); None when the layer has a
    dense use."""
    layer = case.layers[k]
    if any(kind != "linear" for kind in layer.uses):
        return None
    uses = [case.use(m, k, u) for u in range(len(layer.uses))]
    return np.concatenate([a["X"] for a in uses]), np.concatenate([a["D"] for a in uses])


def split_flat(flat: np.ndarray, layers) -> list:
    """A flat vector over ``layers`` (in order) cut into one array of each layer's shape."""
    out, start = [], 0
    for layer in layers:
        out.append(flat[start:start + layer.size].reshape(layer.shape))
        start += layer.size
    return out


def reference_history(case: Case) -> list:
    """Per microbatch a dict ``{"G_in", "pg", "G_out"}`` of per-layer lists, from the NumPy reference."""
    s, layers = case.settings, case.layers
    history = []
    if s.variant == "intra":
        G = [np.zeros(layer.shape) for layer in layers]
        for m in range(case.n_microbatches):
            w = case.weights(m)
            pg = [np.tensordot(w, layer_seq_grads(case, m, k), axes=1) for k in range(len(layers))]
            out = []
            for k, layer in enumerate(layers):
                factors = layer_factors(case, m, k)
                step = pg[k] if factors is None else reference.intra_project(
                    pg[k], *factors, rank=s.intra_rank, form=s.intra_form)
                out.append(G[k] + step)
            history.append({"G_in": G, "pg": pg, "G_out": out})
            G = out
        return history
    microbatches = [(microbatch_seq_grads(case, m), case.weights(m)) for m in range(case.n_microbatches)]
    steps = reference.accumulate_history(
        microbatches, blocks=[layer.size for layer in layers],
        solver="none" if s.variant == "none" else s.solver, passes=s.passes, ridge=s.ridge,
        relative_bound=s.relative_bound, shrinkage=s.shrinkage,
    )
    return [{"G_in": split_flat(st.before, layers), "pg": split_flat(st.pg, layers), "G_out": split_flat(st.after, layers)}
            for st in steps]


def compute_expected(case: Case) -> Case:
    """Fill ``G_in``, ``pg`` and ``G_out`` of every microbatch and layer from the reference (in place)."""
    for m, record in enumerate(reference_history(case)):
        for name, per_layer in record.items():
            for k, value in enumerate(per_layer):
                case.arrays[layer_key(m, k, name)] = np.ascontiguousarray(value, dtype=np.float64)
    return case
