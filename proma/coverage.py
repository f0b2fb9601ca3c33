"""Coverage check: every use of a covered parameter in the autograd graph must belong to a captured module call.

PROMA's per-sequence gradients of a parameter are assembled from the module calls its hooks captured. A use
the hooks cannot see (a fused LM head computing ``F.linear(h, embedding.weight)``, a custom kernel reading a
weight) would silently drop that use's share of the gradient. This module turns that limitation into an error.

How (graph terms: a node is an autograd ``grad_fn``; an edge n -> m means n passes gradient to m):

- at each captured call, :func:`call_nodes` walks the call's own sub-graph, from its output's node down to
  the nodes of its input tensors (exclusive), and keeps the *owned* nodes: those from which one of the
  module's own parameters' ``AccumulateGrad`` nodes is reachable inside the call (for ``nn.Linear``:
  the matmul and the weight transpose / autocast copy; for a norm: the ``weight * x`` product);
- at backward, :func:`check_uses` walks the whole graph from ``seq_logp`` once and requires every edge into a
  covered parameter's ``AccumulateGrad`` or into an owned node to start at an owned node or at a capture tap.
  Anything else is a use that no hook saw; the error names the parameter and the fixes.

The walk reads ``next_functions`` only: it runs no backward and triggers no checkpoint recomputation. Uses
inside a reentrant checkpointed region (``use_reentrant=True``) are not visible in the outer graph (the
region is one opaque node) and are not checked.
"""
from __future__ import annotations

import torch

# a module call's own sub-graph has a handful of nodes; a walk that grows past this bound has escaped
# through an input the hook did not see, so the call's nodes cannot be delimited
MAX_CALL_NODES = 256
# the node torch.utils.checkpoint(use_reentrant=True) puts in the graph for a whole checkpointed region
REENTRANT_NODE = "CheckpointFunctionBackward"


def _tensors(obj):
    """Tensors in (nested) tuples, lists and dicts of hook arguments."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def call_nodes(name: str, output: torch.Tensor, inputs, params: dict) -> dict:
    """Owned autograd nodes of one module call.

    Parameters
    ----------
    name : qualified module name (for errors).
    output : the call's output, before any tap.
    inputs : the call's positional and keyword arguments (tensors anywhere inside are the call's inputs).
    params : {parameter tensor id: qualified parameter name} of the module's covered parameters.

    Returns
    -------
    {node: tuple of parameter names reachable from it inside the call}.
    """
    stop = {t.grad_fn for t in _tensors(inputs) if t.grad_fn is not None}
    root = output.grad_fn
    edges, order, stack, seen = {}, [], [root], set()
    while stack:
        n = stack.pop()
        if n is None or n in seen or n in stop:
            continue
        seen.add(n)
        if len(seen) > MAX_CALL_NODES:
            raise ValueError(f"module {name!r}: its autograd sub-graph reaches past {MAX_CALL_NODES} nodes without "
                             "meeting its inputs; it reads a tensor that is neither an argument nor its own parameter, "
                             "so its uses of parameters cannot be checked")
        order.append(n)
        out = []
        for m, _ in n.next_functions:
            if m is None:
                continue
            var = getattr(m, "variable", None)
            if var is not None:
                if id(var) in params:
                    out.append(params[id(var)])
            else:
                out.append(m)
                stack.append(m)
        edges[n] = out
    # a node is owned when a parameter is reachable from it: propagate from the leaves up (reverse DFS order
    # visits children after parents, so iterate to a fixed point; the sub-graph is tiny)
    reach = {n: set() for n in order}
    changed = True
    while changed:
        changed = False
        for n in reversed(order):
            r = reach[n]
            size = len(r)
            for m in edges[n]:
                if isinstance(m, str):
                    r.add(m)
                elif m in reach:
                    r |= reach[m]
            changed |= len(r) != size
    return {n: tuple(sorted(r)) for n, r in reach.items() if r}


def accumulate_node(p: torch.Tensor):
    """The ``AccumulateGrad`` node of leaf ``p`` (the one every graph built from ``p`` points to)."""
    return p.view_as(p).grad_fn.next_functions[0][0]


def check_uses(seq_logp: torch.Tensor, covered, owned: dict, taps: set) -> int:
    """Raise ValueError when a covered parameter is used by a node no captured call owns.

    Parameters
    ----------
    seq_logp : (b,) the tensor the backward starts from.
    covered : iterable of (parameter tensor, qualified name), every parameter the hooks are responsible for.
    owned : {node: parameter names} merged over the captured calls (:func:`call_nodes`).
    taps : the capture taps' nodes (their edge into a call's output node is the captured use itself).

    Returns
    -------
    The number of reentrant checkpoint regions met (opaque nodes whose inside is not checked).
    """
    accs = {}
    for p, name in covered:
        if p.requires_grad:
            accs[accumulate_node(p)] = name
    root = seq_logp.grad_fn
    stack, seen, reentrant = [root], set(), 0
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        reentrant += type(n).__name__ == REENTRANT_NODE
        if n in taps:   # a tap passes the gradient to the output of the call it captured
            stack.extend(m for m, _ in n.next_functions if m is not None)
            continue
        mine = owned.get(n, ())
        for m, _ in n.next_functions:
            if m is None:
                continue
            if m in accs:
                if accs[m] not in mine:
                    _raise(accs[m], n)
                continue
            for param in owned.get(m, ()):
                if param not in mine:
                    _raise(param, n)
            stack.append(m)
    return reentrant


def leaf_tensors(seq_logp: torch.Tensor) -> list:
    """Every leaf tensor that a backward of ``seq_logp`` accumulates into (outside reentrant regions)."""
    stack, seen, leaves = [seq_logp.grad_fn], set(), []
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        var = getattr(n, "variable", None)
        if var is not None:
            leaves.append(var)
        stack.extend(m for m, _ in n.next_functions)
    return leaves


def _raise(param: str, node) -> None:
    raise ValueError(
        f"parameter {param!r} is used by {type(node).__name__}, an operation outside every captured module call, "
        "so PROMA would silently lose that use's share of its gradient. Compute that use through the module "
        "(e.g. call the model's lm_head instead of a fused head that reads the tied weight; with TRL use "
        "proma.integrations.trl, which switches to the unfused head), or register a layer rule "
        "(proma.layers.register) for the module that makes the call")
