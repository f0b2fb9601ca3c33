"""Which trainable parameter is handled how: its owners (tied weights), its rules, and the routing of hooked calls.

Every trainable parameter gets one :class:`Handling`:

- ``RULE``: a layer rule covers every module that holds it; its captured factors feed the variant's update
  (the PROMA projection; for intra the intra projection of a Linear weight, plain accumulation otherwise);
- ``EXCLUDED_CAPTURED``: named in ``exclude=`` but covered by rules; plain accumulation from the same captured
  factors (no extra backward pass; it was called ``RULE_PLAIN``);
- ``AUTOGRAD_PLAIN``: some holder has no rule; plain accumulation of its weighted microbatch gradient from
  one extra ``torch.autograd.grad`` restricted to these parameters. Allowed only for parameters named in
  ``exclude=`` (and for ``variant="none"``, which runs a plain backward anyway).

A parameter held by several modules (a tied embedding / output head) lists every owner; a module called
several times in one forward delivers one use per call, and the parameter is complete when all have arrived.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from .layers import find_rule, work_dtype_for

# The stats' rule label of a parameter without a layer rule (it is accumulated plainly through autograd).
NO_RULE_LABEL = "no rule"


class Handling(enum.Enum):
    """How the accumulator obtains and accumulates one parameter's microbatch gradient."""

    RULE = "rule, the variant's update"
    EXCLUDED_CAPTURED = "rule, plain (excluded)"
    AUTOGRAD_PLAIN = "no rule, autograd, plain (excluded)"


@dataclass(eq=False)
class ParamEntry:
    """One trainable parameter (bookkeeping owned by the accumulator, never set on the tensor).

    Attributes
    ----------
    name : its name in ``model.named_parameters()``.
    param : the parameter.
    owners : ((module name, attribute), ...) of every module holding it (several for tied weights).
    rules : names of the layer rules covering its owners (empty for ``AUTOGRAD_PLAIN``).
    handling : :class:`Handling`.
    """

    name: str
    param: nn.Parameter
    owners: tuple
    rules: tuple
    handling: Handling

    @property
    def rule_label(self) -> str:
        """``"embedding+linear"``-style rule names, or :data:`NO_RULE_LABEL`."""
        return NO_RULE_LABEL if self.handling is Handling.AUTOGRAD_PLAIN else "+".join(self.rules)

    @property
    def work_dtype(self) -> torch.dtype:
        return work_dtype_for(self.param.dtype)


class Inventory:
    """The trainable parameters of ``model`` with their handling, and which hooked module feeds which.

    Parameters
    ----------
    model : nn.Module
    exclude : frozenset of parameter names that get plain accumulation.
    require_rules : bool
        Raise for a parameter without a rule that is not excluded (False for ``variant="none"``).

    Attributes
    ----------
    entries : list of :class:`ParamEntry`, in ``named_parameters()`` order.
    modules : {qualified module name: module}, every module of the model under its first name.
    routes : {module name: [(attribute, ParamEntry)]}, the parameters a call of that module contributes to.
    """

    def __init__(self, model: nn.Module, exclude: frozenset, *, require_rules: bool):
        self.modules = dict(model.named_modules())
        owners = self._owners()
        names, tensors = {}, {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                names[id(p)], tensors[id(p)] = n, p
        unknown = exclude - set(names.values())
        if unknown:
            raise ValueError(f"exclude names no trainable parameter: {sorted(unknown)}")
        self.entries = [self._entry(name, tensors[pid], owners[pid], name in exclude, require_rules)
                        for pid, name in names.items()]
        self.routes: dict = {}
        for e in self.captured():
            for mname, attr in e.owners:
                self.routes.setdefault(mname, []).append((attr, e))

    def _owners(self) -> dict:
        """id(parameter) -> sorted unique (module name, attribute) of every module holding it directly."""
        owners: dict = {}
        for mname, module in self.modules.items():
            for attr, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), set()).add((mname, attr))
        return {pid: tuple(sorted(own)) for pid, own in owners.items()}

    def _entry(self, name, param, owners, excluded: bool, require_rules: bool) -> ParamEntry:
        rules, covered = set(), True
        for mname, attr in owners:
            module = self.modules[mname]
            rule = find_rule(module)
            if rule is None or attr not in rule.param_names(module):
                covered = False
            else:
                rules.add(rule.name)
        if not covered and not excluded and require_rules:
            where = ", ".join(f"{m or '<model>'}.{a} ({type(self.modules[m]).__name__})" for m, a in owners)
            raise ValueError(
                f"trainable parameter {name!r} has no PROMA layer rule (used as {where}); register a "
                "rule (proma.layers.register) or pass it in exclude= for plain accumulation")
        if not covered:
            handling = Handling.AUTOGRAD_PLAIN
        else:
            handling = Handling.EXCLUDED_CAPTURED if excluded else Handling.RULE
        return ParamEntry(name=name, param=param, owners=owners, rules=tuple(sorted(rules)) if covered else (),
                          handling=handling)

    def with_handling(self, *handlings: Handling) -> list:
        """The entries handled in one of the given ways, in inventory order."""
        return [e for e in self.entries if e.handling in handlings]

    def captured(self) -> list:
        """Entries whose contributions come from the hooks (every handling but ``AUTOGRAD_PLAIN``)."""
        return self.with_handling(Handling.RULE, Handling.EXCLUDED_CAPTURED)

    def hooked_modules(self) -> dict:
        """{module name: module} of every owner of a captured parameter, in inventory order."""
        return {mname: self.modules[mname] for e in self.captured() for mname, _ in e.owners}

    def signature_items(self) -> list:
        """(name, shape, dtype) of every entry: what every rank of a data-parallel run must agree on."""
        return [(e.name, tuple(e.param.shape), str(e.param.dtype)) for e in self.entries]
