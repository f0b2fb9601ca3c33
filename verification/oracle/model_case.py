"""An oracle case from a real PyTorch model: its linear factors and per-sequence gradients (the oracle's own capture).

Independent of ``proma``'s own capture code on purpose (the oracle must not share code with what it
judges). Index conventions: b sequences, T padded length, t tokens kept, i in-features, o out-features.

- :func:`linear_factors`: forward hooks keep each ``nn.Linear``'s input (b, T, i) and a tensor hook on its
  output keeps the gradient (b, T, o) of ONE backward of ``seq_logp.sum()``.
- :func:`per_sequence_grads`: the gradient of each ``seq_logp[j]`` with respect to every trainable parameter,
  by b separate backward passes (brute force; fine for the small models the oracle uses).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import reference

from .format import Layer, use_key, weights_key

# Relative agreement required between autograd per-sequence gradients and those from the captured linear
# factors (float64 model; both are exact up to rounding).
CAPTURE_RTOL = 1e-9


def trainable_parameters(model: nn.Module) -> list:
    """``[(name, parameter)]`` of trainable parameters, each shared parameter once (first name)."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def linear_factors(model: nn.Module, seq_logp_fn, batch: dict, token_mask: torch.Tensor) -> tuple:
    """Per-sequence log-probabilities and the (X, D, seq) factors of every ``nn.Linear`` call.

    Parameters
    ----------
    model : nn.Module
        Activations have dim 0 = sequence: (b, T, features).
    seq_logp_fn : callable ``(model, batch) -> (b,)``
    batch : dict
    token_mask : (b, T) tensor
        Positions kept (real tokens); the gradient at every dropped position must be exactly zero.

    Returns
    -------
    seq_logp : (b,) tensor, detached
    factors : dict ``id(weight) -> list of (X (t, i), D (t, o), seq (t,))`` NumPy arrays, one per call
    """
    calls, handles = [], []

    def forward_hook(module, inputs, output):
        record = {"weight": module.weight, "X": inputs[0].detach(), "D": None}
        calls.append(record)

        def keep(grad):
            record["D"] = grad.detach()

        output.register_hook(keep)

    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            handles.append(module.register_forward_hook(forward_hook))
    try:
        seq_logp = seq_logp_fn(model, batch)
        seq_logp.sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    keep = token_mask.bool()
    factors = {}
    for rec in calls:
        X, D = rec["X"], rec["D"]
        if D is None:  # output not on the path to seq_logp: contributes nothing
            D = torch.zeros(*X.shape[:-1], rec["weight"].shape[0], dtype=X.dtype)
        if X.shape[:2] != keep.shape:
            raise ValueError(f"linear input of shape {tuple(X.shape)} is not laid out (b, T, i) = {tuple(keep.shape)}")
        dropped = D[~keep]
        if dropped.numel() and dropped.abs().max() > 0:
            raise ValueError("a dropped (padding) position carries a non-zero output gradient")
        seq = torch.arange(X.shape[0]).unsqueeze(1).expand(keep.shape)[keep]
        factors.setdefault(id(rec["weight"]), []).append(
            (X[keep].cpu().double().numpy(), D[keep].cpu().double().numpy(), seq.cpu().numpy().astype(np.int64)))
    return seq_logp.detach(), factors


def per_sequence_grads(model: nn.Module, seq_logp_fn, batch: dict, params=None) -> list:
    """Gradients of each sequence's log-probability: per parameter an array (b, *shape), float64.

    One forward, then b backward passes of ``seq_logp[j]`` (retaining the graph).
    """
    params = [p for _, p in trainable_parameters(model)] if params is None else list(params)
    seq_logp = seq_logp_fn(model, batch)
    b = seq_logp.shape[0]
    out = [np.zeros((b, *p.shape)) for p in params]
    for j in range(b):
        grads = torch.autograd.grad(seq_logp[j], params, retain_graph=j < b - 1, allow_unused=True)
        for k, g in enumerate(grads):
            if g is not None:
                out[k][j] = g.detach().cpu().double().numpy()
    return out


def linear_weight_owners(model: nn.Module) -> dict:
    """``id(parameter) -> True`` when some module other than an ``nn.Linear`` (as its weight) owns it.

    Such a parameter (an input embedding tied to the output head, a bias, a norm weight) gets a ``"dense"``
    use in an oracle case for what its linear uses do not cover.
    """
    other = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            linear_weight = isinstance(module, nn.Linear) and pname == "weight"
            other[id(p)] = other.get(id(p), False) or not linear_weight
    return other


def capture_case_arrays(model, seq_logp_fn, batches, weights) -> tuple:
    """Layers and arrays (FORMAT.md keys, no expected arrays) of ``model`` on the given microbatches.

    ``model`` should be float64 (a copy); it is put in eval mode.
    """
    model.eval()
    named = trainable_parameters(model)
    other_owner = linear_weight_owners(model)
    arrays, layers = {}, None
    for m, (batch, w) in enumerate(zip(batches, weights)):
        b = batch["input_ids"].shape[0]
        _, factors = linear_factors(model, seq_logp_fn, batch, batch["attention_mask"])
        grads = per_sequence_grads(model, seq_logp_fn, batch, [p for _, p in named])
        arrays[weights_key(m)] = np.asarray(w, dtype=np.float64)
        mb_layers = []
        for k, ((name, p), total) in enumerate(zip(named, grads)):
            calls = factors.get(id(p), [])
            linear_part = np.zeros_like(total)
            for u, (X, D, seq) in enumerate(calls):
                arrays[use_key(m, k, u, "X")], arrays[use_key(m, k, u, "D")] = X, D
                arrays[use_key(m, k, u, "seq")] = seq
                linear_part += reference.linear_seq_grads(X, D, seq, b)
            uses = ["linear"] * len(calls)
            if other_owner.get(id(p), True):
                arrays[use_key(m, k, len(calls), "seq_grads")] = total - linear_part
                uses.append("dense")
            else:
                err = np.linalg.norm(total - linear_part) / max(np.linalg.norm(total), 1e-300)
                if err > CAPTURE_RTOL:
                    raise RuntimeError(f"captured factors of {name} disagree with autograd (rel err {err:.2e})")
            mb_layers.append(Layer(name, tuple(p.shape), tuple(uses)))
        if layers is not None and mb_layers != layers:
            raise RuntimeError(f"microbatch {m} has different layer uses than microbatch 0")
        layers = mb_layers
    return layers, arrays
