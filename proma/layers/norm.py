"""Normalisation layers with an elementwise scale: out = weight * xhat(x) (+ bias).

Covers ``nn.LayerNorm``, ``nn.RMSNorm`` and any module whose class name ends in ``RMSNorm`` or
``LayerNorm`` and that carries a ``weight`` parameter (``transformers``' ``Qwen3RMSNorm``,
``LlamaRMSNorm``, ...), matched by structure rather than exact class. With S = weight.shape (the trailing
normalised dimensions), D (b, n, *S) and xhat (b, n, *S):

- weight: ``g_j = sum_{t in j} D_t * xhat_t``  -> :class:`SeqGrads` (b, *S);
- bias:   ``g_j = sum_{t in j} D_t``           -> :class:`SeqGrads` (b, *S).

xhat is recomputed at backward time from the saved input by running the module itself with weight = 1
and bias = 0 (``torch.func.functional_call``), so whatever the module does internally (HF's RMSNorm
normalises in float32 and casts back) is reproduced exactly. Because that only holds for modules of the
form ``weight * xhat + bias``, the first captured call of every module is validated: a module computing
e.g. ``(1 + weight) * xhat`` (Gemma) is rejected with a ValueError instead of being silently mishandled.
"""
from __future__ import annotations

import torch
from torch import nn

from .kinds import SeqGrads


# How far (in units of the output dtype's eps, relative to the output's size) a module matched as a norm by
# structure may deviate from weight * xhat (+ bias): its own normalisation may round in another order.
NORM_MATCH_ULPS = 64


class NormRule:
    name = "norm"

    def matches(self, module) -> bool:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            return False
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return type(module).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward)
        name = type(module).__name__
        return name.endswith("RMSNorm") or name.endswith("LayerNorm")

    def param_names(self, module):
        bias = getattr(module, "bias", None)
        return ("weight", "bias") if isinstance(bias, nn.Parameter) else ("weight",)

    def save(self, module, args, output):
        return args[0]

    @staticmethod
    def normalized(module, x):
        """xhat: the module's output with weight = 1 and bias = 0 (no graph)."""
        params = {"weight": torch.ones_like(module.weight)}
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            params["bias"] = torch.zeros_like(module.bias)
        with torch.no_grad():
            return torch.func.functional_call(module, params, (x,), strict=False)

    def validate(self, module, args, output):
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(f"{type(module).__name__}: expected a tensor input and output")
        with torch.no_grad():
            xhat = self.normalized(module, args[0])
            expect = module.weight * xhat
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                expect = expect + module.bias
            if expect.shape != output.shape:
                raise ValueError(f"{type(module).__name__}: output shape {tuple(output.shape)} is not "
                                 f"weight * xhat shape {tuple(expect.shape)}")
            tol = NORM_MATCH_ULPS * torch.finfo(output.dtype).eps * (1.0 + float(output.abs().max()))
            err = float((expect.to(output.dtype) - output).abs().max())
            if err > tol:
                raise ValueError(
                    f"{type(module).__name__} matched the norm rule by name but does not compute "
                    f"weight * xhat (+ bias) (max deviation {err:.3g}); register a rule for it or exclude "
                    "its parameters")

    def contributions(self, module, saved, grad_output, names):
        b = grad_output.shape[0]
        S = module.weight.shape
        D = grad_output.reshape(b, -1, *S)
        out = {}
        if "weight" in names:
            xhat = self.normalized(module, saved).reshape(b, -1, *S)
            out["weight"] = SeqGrads((D * xhat.to(D.dtype)).sum(dim=1))
        if "bias" in names:
            out["bias"] = SeqGrads(D.sum(dim=1))
        return out
