"""Where the running gradient G of each parameter lives: ``p.grad``, or a float32 buffer for 16-bit parameters.

For float32 / float64 parameters G *is* ``p.grad`` (updated in place). For bfloat16 / float16 parameters
the accumulation runs in float32: G lives in a buffer owned by the store, and after every update ``p.grad``
is set to G rounded to the parameter dtype. The store remembers which ``p.grad`` tensor it wrote, so that a
``p.grad`` set from outside (an optimizer's ``zero_grad``, a user's own backward) is taken as the new G.
"""
from __future__ import annotations

import torch

from .layers import work_dtype_for

HALF_DTYPES = (torch.float16, torch.bfloat16)


class GradStore:
    """Running gradients keyed by parameter identity; nothing is attached to the parameters."""

    def __init__(self):
        self.buffers: dict = {}   # id(p) -> float32 running gradient of a 16-bit parameter
        self._written: dict = {}  # id(p) -> the p.grad tensor the store last wrote for it

    def clear(self) -> None:
        """Forget every buffer (a new accumulation starts with ``p.grad = None``)."""
        self.buffers.clear()
        self._written.clear()

    def running(self, param: torch.Tensor) -> torch.Tensor | None:
        """The running gradient G of ``param`` in its work dtype, or None when it is zero / unset."""
        g = param.grad
        if g is None:
            self.buffers.pop(id(param), None)
            return None
        if param.dtype in HALF_DTYPES:
            buf = self.buffers.get(id(param))
            if buf is None or self._written.get(id(param)) is not g:
                buf = g.float()  # p.grad was set outside the accumulator: take it as G
                self.buffers[id(param)] = buf
            return buf
        return g

    def running_or_zeros(self, param: torch.Tensor) -> torch.Tensor:
        """:meth:`running`, or a zero tensor of the parameter's shape in its work dtype."""
        G = self.running(param)
        if G is None:
            G = torch.zeros(param.shape, dtype=work_dtype_for(param.dtype), device=param.device)
        return G

    def store(self, param: torch.Tensor, G: torch.Tensor) -> None:
        """Make ``G`` (work dtype) the running gradient of ``param``; ``p.grad`` follows."""
        if param.dtype in HALF_DTYPES:
            self.buffers[id(param)] = G
            param.grad = G.to(param.dtype)
            self._written[id(param)] = param.grad
        elif param.grad is not G:
            param.grad = G

    def average_(self, params: list, all_reduce_mean_) -> None:
        """Replace the running gradient of every parameter by its mean over the ranks.

        ``all_reduce_mean_(tensors)`` averages a list of tensors in place across the ranks. A parameter
        without a gradient on every rank keeps ``grad = None`` (optimizers then skip it); one that some rank
        holds counts as zero on the others.
        """
        if not params:
            return
        running = [self.running_or_zeros(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=running[0].dtype,
                           device=running[0].device)
        all_reduce_mean_(running + [has])
        for p, G, h in zip(params, running, has.tolist()):
            if h > 0:
                self.store(p, G)
            else:
                p.grad = None
