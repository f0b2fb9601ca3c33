"""Per-rule harness: a layer rule's Grams and the accumulated PROMA update, checked against per-sequence autograd.

A layer rule (built-in or registered with ``proma.layers.register``) is tested by one call, as Opacus' grad
samplers all call one ``run_test``::

    check_rule(MyModule(...).double(), [x_0, x_1, x_2])      # one input per microbatch, dim 0 = sequences

The module runs inside :class:`RuleProbe`: a fixed random readout (a buffer, not a parameter) and a
log-softmax turn its output (b, ..., f) into one log-probability per sequence, so the checked parameters are
exactly the module's own. For every trainable parameter of the module:

1. Gram: per microbatch, the rule's contributions (captured by :class:`proma.capture.Capture`, combined in
   a :class:`proma.layers.Block` with each strategy) give K (b, b), checked against ``g g^T`` of the
   per-sequence gradients g (b, P) from one autograd call per sequence;
2. update: ``ProjectedAccumulator`` over all microbatches, for each strategy and solver setting, checked
   against ``reference.accumulate`` on the same per-sequence gradients (one block per parameter tensor).
"""
from __future__ import annotations

import torch
from torch import nn

from proma import PUBLISHED
from proma.capture import Capture
from proma.layers import Block, find_rule
from verification.tolerances import FLOAT64_RTOL

from verification.testkit import per_sequence_grads, rel_err, trainable

from proma_testkit import run_with_oracle

READOUT_CLASSES = 5   # width of the probe's softmax readout
STRATEGIES_CHECKED = ("materialize", "ghost")
SETTINGS_CHECKED = ({"solver": "exact"}, PUBLISHED.as_kwargs())


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
    params = trainable(probe)
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
            assert contribs[id(p)], f"no layer rule contributed to parameter {name!r}"
            grams[name] = Block(contribs[id(p)], strategy=strategy, work_dtype=p.dtype).gram()
    return grams


def check_rule(module: nn.Module, inputs: list, *, seed: int = 0, rtol: float = FLOAT64_RTOL,
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
    params = trainable(probe)
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
                assert errors[key] <= rtol, f"{key}: relative error {errors[key]:.3g} > {rtol}"
    for strategy in strategies:
        for kw in settings:
            got, want = run_with_oracle(probe, microbatches, probe_seq_logp, dict(kw, strategy=strategy))
            key = f"update {kw['solver']} {strategy}"
            errors[key] = rel_err(got, want)
            assert errors[key] <= rtol, f"{key}: relative error {errors[key]:.3g} > {rtol}"
    return errors
