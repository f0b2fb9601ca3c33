"""Registry of per-layer rules: which modules PROMA can see through, and what each call contributes.

A rule is an object with

- ``name`` (str) and ``matches(module) -> bool`` (structure / duck typing, not an exact-class lookup, so
  that e.g. ``transformers``' ``Qwen3RMSNorm`` is handled like ``torch.nn.RMSNorm``);
- ``param_names(module) -> tuple[str, ...]``: the module's own parameters (``recurse=False``) it covers;
- ``save(module, args, output)``: what the forward hook keeps of one call (inputs X, ids, ...), sharing
  storage with what autograd saves anyway;
- ``contributions(module, saved, grad_output, names) -> {name: Contribution}``: the call's contribution to
  the per-sequence gradients of the named parameters, given the output gradient D of that call (dim 0 =
  sequences). A contribution is of a built-in kind or of a new one: a subclass of
  :class:`~proma.layers.base.Contribution`, the open interface (Gram, inner products, weighted update, wire
  form) that everything downstream uses (docs/extending.md);
- optionally ``validate(module, args, output)``: called on a module's first captured call; raises
  ``ValueError`` when the module does not compute what the rule assumes.

``register(rule)`` puts a user rule in front of the built-ins; ``find_rule(module)`` returns the first
match or ``None``; :func:`proma.testing.check_rule` tests a rule in one call. Built-ins: :mod:`.linear` (``nn.Linear``), :mod:`.embedding` (``nn.Embedding``),
:mod:`.norm` (LayerNorm, RMSNorm of torch and of ``transformers``).
"""
from __future__ import annotations

from .base import Contribution
from .kinds import IdsFactors, OuterFactors, SeqGrads
from .block import STRATEGIES, Block, work_dtype_for
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import NormRule

_RULES: list = [LinearRule(), EmbeddingRule(), NormRule()]


def register(rule) -> None:
    """Add a rule; it takes precedence over the built-in rules (and over rules registered before it)."""
    for attr in ("name", "matches", "param_names", "save", "contributions"):
        if not hasattr(rule, attr):
            raise ValueError(f"rule must define {attr!r}; got {type(rule).__name__}")
    _RULES.insert(0, rule)


def unregister(rule) -> None:
    """Remove a rule added with :func:`register`."""
    _RULES.remove(rule)


def find_rule(module):
    """The first rule that matches ``module``, or ``None``."""
    for rule in _RULES:
        if rule.matches(module):
            return rule
    return None


__all__ = [
    "Contribution", "OuterFactors", "IdsFactors", "SeqGrads", "Block", "STRATEGIES", "work_dtype_for",
    "LinearRule", "EmbeddingRule", "NormRule", "register", "unregister", "find_rule",
]
