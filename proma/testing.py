"""The per-rule harness, shipped: :func:`check_rule` checks a layer rule's Grams and the accumulated PROMA
update against per-sequence autograd and the float64 NumPy reference.

A layer rule (built-in or registered with ``proma.layers.register``; its contributions of a built-in kind or
of a new one) is tested by one call, as Opacus' grad samplers all call one ``run_test``::

    from proma.testing import check_rule
    check_rule(MyModule(...).double(), [x_0, x_1, x_2])      # one input per microbatch, dim 0 = sequences

The module runs inside :class:`RuleProbe`: a fixed random readout (a buffer, not a parameter) and a
log-softmax turn its output (b, ..., f) into one log-probability per sequence, so the checked parameters are
exactly the module's own. For every trainable parameter of the module:

1. Gram: per microbatch, the rule's contributions (captured by :class:`proma.capture.Capture`, combined in
   a :class:`proma.layers.Block` with each strategy) give K (b, b), checked against ``g g^T`` of the
   per-sequence gradients g (b, P) from one autograd call per sequence;
2. update: ``ProjectedAccumulator`` over all microbatches, for each strategy and solver setting, checked
   against ``reference.accumulate`` on the same per-sequence gradients (one block per parameter tensor).

Index conventions: b sequences of a microbatch, P flattened parameter size.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import reference

from .accumulator import ProjectedAccumulator
from .capture import Capture
from .layers import Block, find_rule
from .options import PUBLISHED

# float64 agreement up to rounding: the value of verification.tolerances.FLOAT64_RTOL (a test keeps them equal;
# the library does not import verification)
DEFAULT_RTOL = 1e-9
READOUT_CLASSES = 5   # width of the probe's softmax readout
STRATEGIES_CHECKED = ("materialize", "ghost")
SETTINGS_CHECKED = ({"solver": "exact"}, PUBLISHED.as_kwargs())

__all__ = ["check_rule", "RuleProbe", "rule_grams", "per_sequence_grads", "accumulate_with_reference", "rel_err",
           "DEFAULT_RTOL"]


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the denominator floored at the smallest normal double's neighbourhood)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _trainable(model: nn.Module) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_sequence_grads(model: nn.Module, logp: torch.Tensor, params: list) -> np.ndarray:
    """(b, P_total) float64 per-sequence gradients of ``logp`` (b,) by one autograd call per sequence."""
    rows = []
    for i in range(logp.shape[0]):
        gs = torch.autograd.grad(logp[i], [p for _, p in params], retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                               for g, (_, p) in zip(gs, params)]))
    return torch.stack(rows).cpu().numpy()


def accumulate_with_reference(model: nn.Module, microbatches: list, forward, acc_kwargs: dict):
    """``ProjectedAccumulator(model, **acc_kwargs)`` over ``microbatches`` [(batch, w (b,))] and the reference on
    the same per-sequence gradients: (its flat p.grad, ``reference.accumulate``'s), float64 (P_total,).

    ``forward(model, batch)`` returns seq_logp (b,). ``variant`` "proma" or "none" (intra is not a rule's concern).
    """
    params = _trainable(model)
    acc = ProjectedAccumulator(model, **acc_kwargs)
    oracle = []
    try:
        acc.zero_grad()
        for batch, w in microbatches:
            with acc.paused():
                oracle.append((per_sequence_grads(model, forward(model, batch), params), w.double().numpy()))
            acc.backward(forward(model, batch), w)
        got = np.concatenate([(np.zeros(p.numel()) if p.grad is None else p.grad.detach().double().reshape(-1).numpy())
                              for _, p in params])
    finally:
        acc.close()
    opts = {k: acc_kwargs[k] for k in ("passes", "ridge", "relative_bound", "shrinkage") if k in acc_kwargs}
    solver = acc_kwargs.get("solver", "exact") if acc_kwargs.get("variant", "proma") == "proma" else "none"
    want = reference.accumulate(oracle, blocks=[p.numel() for _, p in params], solver=solver, **opts)
    return got, want


class RuleProbe(nn.Module):
    """``module`` followed by a fixed readout: ``module(x) @ readout``, logits (b, ..., READOUT_CLASSES)."""

    def __init__(self, module: nn.Module, out_features: int, dtype: torch.dtype, seed: int):
        super().__init__()
        self.module = module
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("readout", torch.randn(out_features, READOUT_CLASSES, generator=gen, dtype=dtype))

    def forward(self, x):
        return self.module(x) @ self.readout


def probe_seq_logp(probe: RuleProbe, batch) -> torch.Tensor:
    """(b,) sum over every position of log-softmax(logits)[target]; ``batch`` = (x, targets)."""
    x, targets = batch
    lp = torch.log_softmax(probe(x), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp.reshape(lp.shape[0], -1).sum(dim=1)


def rule_grams(probe: RuleProbe, batch, strategy: str) -> dict:
    """{parameter name: K (b, b) float64} from the rules' contributions of one microbatch, via a Block."""
    params = _trainable(probe)
    contribs = {id(p): [] for _, p in params}

    def on_grad(use):
        covered = use.rule.param_names(use.module)
        names = tuple(a for a, p in use.module.named_parameters(recurse=False) if a in covered and id(p) in contribs)
        out = use.rule.contributions(use.module, use.saved, use.grad_output, names)
        for a in names:
            contribs[id(getattr(use.module, a))].append(out[a])

    cap = Capture({n: m for n, m in probe.named_modules() if find_rule(m) is not None}, on_grad=on_grad)
    try:
        cap.backward(probe_seq_logp(probe, batch))
    finally:
        cap.close()
    grams = {}
    with torch.no_grad():  # as inside the backward pass, where the accumulator forms its blocks
        for name, p in params:
            if not contribs[id(p)]:
                raise AssertionError(f"no layer rule contributed to parameter {name!r}")
            grams[name] = Block(contribs[id(p)], strategy=strategy, work_dtype=p.dtype).gram()
    return grams


def check_rule(module: nn.Module, inputs: list, *, seed: int = 0, rtol: float = DEFAULT_RTOL,
               strategies=STRATEGIES_CHECKED, settings=SETTINGS_CHECKED) -> dict:
    """Check the rules that cover ``module``'s parameters; raises AssertionError naming the first mismatch.

    Parameters
    ----------
    module : the module under test (float64 for the default tolerance); every trainable parameter must be
        covered by a layer rule.
    inputs : one input per microbatch, each with dim 0 = sequences (b_m, ...), what ``module(x)`` takes.
    seed : seeds the readout, the targets and the loss weights.
    rtol : relative tolerance (Frobenius norm) of every comparison.
    strategies : Block strategies to check. settings : ProjectedAccumulator keyword sets to check.

    Returns
    -------
    dict {check name: relative error}, every value <= rtol.
    """
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        out_features = module(inputs[0]).shape[-1]
    probe = RuleProbe(module, out_features, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    microbatches = []
    for x in inputs:
        with torch.no_grad():
            logits = probe(x)
        targets = torch.randint(0, READOUT_CLASSES, logits.shape[:-1], generator=gen)
        microbatches.append(((x, targets), torch.randn(x.shape[0], generator=gen, dtype=torch.float64)))
    errors = {}
    params = _trainable(probe)
    for m, (batch, _) in enumerate(microbatches):
        seq = per_sequence_grads(probe, probe_seq_logp(probe, batch), params)
        start = 0
        want = {}
        for name, p in params:
            g = seq[:, start:start + p.numel()]
            start += p.numel()
            want[name] = g @ g.T
        for strategy in strategies:
            for name, K in rule_grams(probe, batch, strategy).items():
                key = f"gram {name} microbatch {m} {strategy}"
                errors[key] = rel_err(K.numpy(), want[name])
                if not errors[key] <= rtol:
                    raise AssertionError(f"{key}: relative error {errors[key]:.3g} > {rtol}")
    for strategy in strategies:
        for kw in settings:
            got, want = accumulate_with_reference(probe, microbatches, probe_seq_logp, dict(kw, strategy=strategy))
            key = f"update {kw['solver']} {strategy}"
            errors[key] = rel_err(got, want)
            if not errors[key] <= rtol:
                raise AssertionError(f"{key}: relative error {errors[key]:.3g} > {rtol}")
    return errors
