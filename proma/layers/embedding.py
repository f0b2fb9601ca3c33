"""``nn.Embedding``: out_t = E[ids_t], E (V, e).

Per call, with ids (b, n) and D (b, n, e): ``g_j[v] = sum_{t in j, ids_t = v} D_t`` -> :class:`IdsFactors`.
Tokens equal to ``padding_idx`` get no gradient (as in ``F.embedding``'s backward). Embeddings with
``max_norm`` (which rewrites E in the forward), ``scale_grad_by_freq`` or sparse gradients are not matched.
"""
from __future__ import annotations

from torch import nn

from .kinds import IdsFactors


class EmbeddingRule:
    name = "embedding"

    def matches(self, module) -> bool:
        return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
                and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse)

    def param_names(self, module):
        return ("weight",)

    def save(self, module, args, output):
        return args[0]

    def contributions(self, module, saved, grad_output, names):
        b = grad_output.shape[0]
        D = grad_output.reshape(b, -1, grad_output.shape[-1])
        ids = saved.reshape(b, -1)
        if module.padding_idx is not None:
            D = D * (ids != module.padding_idx).unsqueeze(-1).to(D.dtype)
        return {"weight": IdsFactors(ids, D, module.num_embeddings)}
