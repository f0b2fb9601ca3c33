"""Capture hooks: each hooked module call's saved inputs and its output gradient, from one backward pass.

Index conventions: b sequences (dim 0 of every activation), n tokens per sequence.

How it works (thin on purpose: no maths here, see :mod:`proma.layers`):

- a forward hook on every module that has a rule keeps what the rule needs of the call (its input X, the
  ids of an embedding; the same tensors autograd saves anyway) and routes the output through
  :class:`_Tap`, an identity autograd function that also depends on one private scalar ``anchor``;
- :meth:`Capture.backward` runs ``torch.autograd.grad(seq_logp.sum(), inputs=[anchor])``: autograd
  executes exactly the nodes between the sequence log-probabilities and the taps, so every tap receives
  its output gradient D = d(sum_i log p_i)/d(output) while parameter gradients (which no requested input
  needs) are never computed. Each tap hands its D to a callback as soon as it arrives, so the caller can
  process and free a layer while the backward pass continues;
- the tap returns a detached alias of the output (not a view), so later in-place operations on a module
  output behave as without the hook, and the D it receives is the gradient of the value the module
  returned.

State lives in the :class:`Capture` object (lists and dicts keyed by module); nothing is attached to
modules or parameters, and :meth:`Capture.close` removes every hook.

Calls are captured only when gradients are enabled and the output requires grad; run other forwards
under ``torch.no_grad()`` or inside :meth:`Capture.paused`. Activation checkpointing (which re-runs the
forward inside the backward) is not supported.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .layers import find_rule


@dataclass
class Use:
    """One captured call of a hooked module.

    Attributes
    ----------
    name : qualified module name in the model.
    module : the module.
    rule : its layer rule.
    saved : what ``rule.save`` kept (input X, ids, ...).
    b : size of dim 0 of the output (number of sequences).
    index : order of the call within the forward passes since the last backward.
    grad_output : D, the gradient of sum_i log p_i w.r.t. the output (None until the backward reaches it).
    """

    name: str
    module: nn.Module
    rule: Any
    saved: Any
    b: int
    index: int
    grad_output: torch.Tensor | None = None


class _Tap(torch.autograd.Function):
    """Identity on ``x`` that reports the gradient reaching it; also depends on ``anchor``."""

    @staticmethod
    def forward(ctx, x, anchor, use, callback):
        ctx.use, ctx.callback = use, callback
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        # report once, and only to the backward pass the capture launched (a user's own backward through
        # the same graph just passes the gradient through)
        if ctx.use is not None and ctx.callback(ctx.use, grad):
            ctx.use = ctx.callback = None
        return grad, None, None, None


@dataclass
class Capture:
    """Forward hooks on ``modules`` ({qualified name: module}), each with its rule.

    Parameters
    ----------
    modules : dict name -> module, every one with a rule (``find_rule``).
    on_grad : callable(Use), called from inside the backward pass when a use's D arrives.
    """

    modules: dict
    on_grad: Callable[[Use], None] = lambda use: None
    uses: list = field(default_factory=list)
    _handles: list = field(default_factory=list)
    _validated: set = field(default_factory=set)
    _paused: int = 0
    _active: bool = False
    _anchor: torch.Tensor | None = None

    def __post_init__(self):
        self._anchor = torch.zeros((), requires_grad=True)
        try:
            for name, module in self.modules.items():
                rule = find_rule(module)
                if rule is None:
                    raise ValueError(f"module {name!r} ({type(module).__name__}) has no layer rule")
                self._handles.append(module.register_forward_hook(self._make_hook(name, rule)))
        except BaseException:
            self.close()
            raise

    def _make_hook(self, name, rule):
        def hook(module, args, output):
            if self._paused or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            if output.dim() == 0:
                raise ValueError(f"module {name!r} returned a scalar; dim 0 must index sequences")
            if id(module) not in self._validated and hasattr(rule, "validate"):
                rule.validate(module, args, output)
                self._validated.add(id(module))
            use = Use(name=name, module=module, rule=rule, saved=rule.save(module, args, output),
                      b=int(output.shape[0]), index=len(self.uses))
            self.uses.append(use)
            return _Tap.apply(output, self._anchor, use, self._deliver)
        return hook

    def _deliver(self, use: Use, grad: torch.Tensor) -> bool:
        if not self._active:
            return False
        use.grad_output = grad
        self.on_grad(use)
        return True

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside this context are not captured (e.g. evaluation with gradients enabled)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def backward(self, seq_logp: torch.Tensor) -> list:
        """One backward pass of ``seq_logp.sum()`` to the taps; returns the uses whose D arrived.

        The captured uses are cleared whatever happens (their graph is consumed).
        """
        uses, self.uses = self.uses, []
        try:
            if uses:
                self._active = True
                try:
                    torch.autograd.grad(seq_logp.sum(), inputs=[self._anchor], allow_unused=True)
                finally:
                    self._active = False
            return [u for u in uses if u.grad_output is not None]
        except BaseException:
            for u in uses:
                u.saved = u.grad_output = None
            raise

    def discard(self) -> None:
        """Forget captured calls (e.g. after a forward that will not be back-propagated)."""
        self.uses = []

    def close(self) -> None:
        """Remove every hook; idempotent."""
        while self._handles:
            self._handles.pop().remove()
        self.uses = []


def hookable_modules(model: nn.Module) -> dict:
    """{qualified name: module} of every module of ``model`` that has a layer rule."""
    return {name: m for name, m in model.named_modules() if find_rule(m) is not None}


@dataclass
class CapturedCall:
    """One module call of a microbatch with its backprop factors (see :func:`capture_factors`).

    Attributes
    ----------
    name, module, rule_name : which module, and the rule that matched it.
    inputs : what the rule saved (for Linear and norms the input X (b, ..., i); for Embedding the ids).
    grad_output : D (b, ..., o), gradient of sum_i log p_i w.r.t. the call's output.
    """

    name: str
    module: nn.Module
    rule_name: str
    inputs: torch.Tensor
    grad_output: torch.Tensor

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(X (t, i), D (t, o), seq_index (t,))``: the call's factors with tokens flattened row-major.

        ``seq_index[t]`` is the sequence (dim-0 index) of token t. For an embedding ``X`` holds the ids (t,).
        """
        b = self.grad_output.shape[0]
        D = self.grad_output.reshape(b, -1, self.grad_output.shape[-1])
        n = D.shape[1]
        if self.rule_name == "embedding":
            X = self.inputs.reshape(-1)
        else:
            X = self.inputs.reshape(b * n, -1)
        seq = torch.arange(b, device=D.device).repeat_interleave(n)
        return X, D.reshape(b * n, -1), seq


def capture_factors(model: nn.Module, seq_logp_fn: Callable[[], torch.Tensor], *, modules=None) -> list:
    """Run ``seq_logp_fn()`` (forward, returning the (b,) sequence log-probabilities) and one backward.

    Returns the backprop factors of every hooked module call: a list of :class:`CapturedCall` in call
    order. Parameter gradients are not touched. Hooks are removed before returning.

    Parameters
    ----------
    model : the model whose modules are hooked.
    seq_logp_fn : zero-argument callable running the forward and returning seq_logp (b,).
    modules : optional {name: module} subset (default: every module with a rule).

    Example
    -------
    >>> calls = capture_factors(model, lambda: seq_logprobs(model, batch))       # doctest: +SKIP
    >>> X, D, seq = calls[0].tokens()
    """
    mods = hookable_modules(model) if modules is None else dict(modules)
    cap = Capture(mods)
    try:
        seq_logp = seq_logp_fn()
        if not isinstance(seq_logp, torch.Tensor) or seq_logp.dim() != 1:
            raise ValueError("seq_logp_fn must return a 1-D tensor (b,) of sequence log-probabilities")
        arrived = cap.backward(seq_logp)
    finally:
        cap.close()
    return [CapturedCall(u.name, u.module, u.rule.name, u.saved.detach(), u.grad_output) for u in arrived]
