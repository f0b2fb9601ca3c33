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
under ``torch.no_grad()`` or inside :meth:`Capture.paused`.

Every backward first checks (:mod:`proma.coverage`) that no covered parameter is used outside the captured
calls (a fused head reading a tied weight, a custom kernel); such a use raises a ValueError naming it.

Activation checkpointing (``torch.utils.checkpoint``, as ``transformers``' ``gradient_checkpointing_enable``):

- non-reentrant (``use_reentrant=False``): the first forward builds the graph the backward runs through
  and is captured; the recomputation inside the backward (recognised by torch's recomputation
  saved-tensor hook being active) is not captured again. The captured inputs X are the first forward's,
  equal to the recomputed ones, and they stay alive until the backward (memory of checkpointed inputs of
  hooked modules is not saved);
- reentrant (``use_reentrant=True``): the first forward runs without gradients and is not captured; the
  recomputation inside the backward is captured, and its D arrives from the nested backward. Torch forbids
  ``autograd.grad`` through such regions, so the capture runs ``seq_logp.sum().backward()`` instead, with
  the ``.grad`` of every covered parameter and of every leaf outside the regions saved before and
  restored after (autograd's parameter gradients
  are computed and discarded: a reentrant step costs one full backward more than a plain one), and the
  D of every call are handed to ``on_grad`` after that backward (all held until then). A module
  called both inside and outside a reentrant region raises a ValueError. Uses inside reentrant regions are
  not covered by the coverage check.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import coverage
from .layers import find_rule

# qualified name of the pack hook torch.utils.checkpoint pushes while it recomputes a non-reentrant region
_RECOMPUTE_HOOK = "_recomputation_hook."


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
    _covered: dict = field(default_factory=dict)     # id(param) -> (param, canonical name)
    _owned: dict = field(default_factory=dict)       # autograd node -> parameter names (coverage)
    _taps: set = field(default_factory=set)
    _forward_modules: set = field(default_factory=set)
    _deferred: list | None = None                     # D that arrived in a reentrant backward, not yet handed on

    def __post_init__(self):
        self._anchor = torch.zeros((), requires_grad=True)
        owns = []
        try:
            for name, module in self.modules.items():
                rule = find_rule(module)
                if rule is None:
                    raise ValueError(f"module {name!r} ({type(module).__name__}) has no layer rule")
                owns.append((name, module, rule, [getattr(module, a) for a in rule.param_names(module)]))
                for attr in rule.param_names(module):
                    p = getattr(module, attr)
                    # a tied parameter is named by all its owners ("a.weight = b.weight")
                    old = self._covered.get(id(p), (p, ""))[1]
                    qual = f"{name}.{attr}" if name else attr
                    self._covered[id(p)] = (p, f"{old} = {qual}" if old else qual)
            for name, module, rule, params in owns:
                own = {id(p): self._covered[id(p)][1] for p in params}
                self._handles.append(module.register_forward_hook(self._make_hook(name, rule, own), with_kwargs=True))
        except BaseException:
            self.close()
            raise

    def _make_hook(self, name, rule, own):
        def hook(module, args, kwargs, output):
            if self._paused or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            in_backward = torch._C._current_graph_task_id() != -1
            if in_backward and _recomputing_non_reentrant():
                return None  # the first forward's call was captured; the backward runs through its graph
            if output.dim() == 0:
                raise ValueError(f"module {name!r} returned a scalar; dim 0 must index sequences")
            if in_backward:
                if not self._active:
                    return None  # a recomputation for a backward the capture did not launch
                if id(module) in self._forward_modules:
                    raise ValueError(f"module {name!r} is called both inside and outside a reentrant checkpointed "
                                     "region; use non-reentrant checkpointing (use_reentrant=False)")
            if id(module) not in self._validated and hasattr(rule, "validate"):
                rule.validate(module, args, output)
                self._validated.add(id(module))
            saved = rule.save(module, args, output)
            if in_backward and isinstance(saved, torch.Tensor):
                saved = saved.detach()  # the recomputed input is in a graph; the rules' algebra must not extend it
            use = Use(name=name, module=module, rule=rule, saved=saved, b=int(output.shape[0]), index=len(self.uses))
            if not in_backward:
                self._owned.update(coverage.call_nodes(name, output, (args, kwargs), own))
            self.uses.append(use)
            tapped = _Tap.apply(output, self._anchor, use, self._deliver)
            if not in_backward:
                self._taps.add(tapped.grad_fn)
            return tapped
        return hook

    def _deliver(self, use: Use, grad: torch.Tensor) -> bool:
        if not self._active:
            return False
        use.grad_output = grad
        if self._deferred is not None:
            self._deferred.append(use)
        else:
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

        The captured uses are cleared whatever happens (their graph is consumed). First checks that no
        covered parameter is used outside the captured calls (ValueError otherwise). Uses captured inside
        reentrant checkpointed regions (during this backward) are appended after the forward's.
        """
        uses, self.uses = self.uses, []
        owned, taps, self._owned, self._taps = self._owned, self._taps, {}, set()
        try:
            if uses:
                reentrant = 0
                if seq_logp.grad_fn is not None:
                    reentrant = coverage.check_uses(seq_logp, self._covered.values(), owned, taps)
                del owned, taps
                self._forward_modules = {id(u.module) for u in uses}
                self._active = True
                try:
                    if reentrant:
                        self._backward_reentrant(seq_logp)
                    else:
                        torch.autograd.grad(seq_logp.sum(), inputs=[self._anchor], allow_unused=True)
                finally:
                    self._active = False
                    self._forward_modules = set()
                    uses, self.uses = uses + self.uses, []
            return [u for u in uses if u.grad_output is not None]
        except BaseException:
            for u in uses:
                u.saved = u.grad_output = None
            raise

    def _backward_reentrant(self, seq_logp: torch.Tensor) -> None:
        """``seq_logp.sum().backward()`` leaving the ``.grad`` of every covered parameter and every other leaf
        reachable outside the reentrant regions as it was."""
        leaves = {id(p): p for p, _ in self._covered.values()}
        leaves.update((id(t), t) for t in coverage.leaf_tensors(seq_logp) if t is not self._anchor)
        kept = [(p, p.grad) for p in leaves.values()]
        for p, _ in kept:
            p.grad = None
        # the callbacks may write .grad: hold them until autograd's own parameter gradients are discarded
        self._deferred = []
        try:
            seq_logp.sum().backward()
        finally:
            for p, g in kept:
                p.grad = g
            self._anchor.grad = None
            arrived, self._deferred = self._deferred, None
        with torch.no_grad():  # as inside the engine, where the callbacks normally run
            for use in arrived:
                self.on_grad(use)

    def discard(self) -> None:
        """Forget captured calls (e.g. after a forward that will not be back-propagated)."""
        self.uses, self._owned, self._taps = [], {}, set()

    def close(self) -> None:
        """Remove every hook; idempotent."""
        while self._handles:
            self._handles.pop().remove()
        self.discard()


def _recomputing_non_reentrant() -> bool:
    """True while torch.utils.checkpoint recomputes a non-reentrant region (its saved-tensor hook is on top)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and _RECOMPUTE_HOOK in getattr(top[0], "__qualname__", "")


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
