"""``nn.Linear``: out = x W^T + bias, W (o, i).

Per call, with X (b, n, i) the inputs and D (b, n, o) the output gradients (every non-feature dimension
after the sequence dimension flattened into n tokens):

- weight: ``g_j = sum_{t in j} D_t^T X_t``  -> :class:`OuterFactors` (A = D, B = X);
- bias:   ``g_j = sum_{t in j} D_t``        -> :class:`SeqGrads` (b, o).
"""
from __future__ import annotations

from torch import nn

from .kinds import OuterFactors, SeqGrads


class LinearRule:
    name = "linear"

    def matches(self, module) -> bool:
        # subclasses that override forward (LoRA, quantised layers) compute something else
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def param_names(self, module):
        return ("weight", "bias") if module.bias is not None else ("weight",)

    def save(self, module, args, output):
        return args[0]

    def contributions(self, module, saved, grad_output, names):
        b = grad_output.shape[0]
        D = grad_output.reshape(b, -1, grad_output.shape[-1])
        out = {}
        if "weight" in names:
            X = saved.reshape(b, -1, saved.shape[-1])
            out["weight"] = OuterFactors(D, X, is_linear_weight=True)
        if "bias" in names:
            out["bias"] = SeqGrads(D.sum(dim=1))
        return out
