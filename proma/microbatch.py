"""One microbatch in flight: its inputs checked, each parameter's contributions collected as they arrive, and
its new running gradients held until the whole microbatch has succeeded (:class:`Transaction`).

:class:`Collector` is the capture callback of one ``ProjectedAccumulator.backward``: when a hooked call's
output gradient D arrives it asks the call's layer rule for the contributions of the parameters routed to
that module, and as soon as every use of a parameter has arrived it hands them to ``on_complete`` (so the
caller can update the parameter and free its factors while the backward pass continues). Parameters that
must wait for the other ranks (``sync="global"``) are held instead and taken with :meth:`Collector.take`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .capture import Use


@dataclass
class IntraFactors:
    """The token rows of every use of one ``nn.Linear`` weight: inputs X (t, i) and output gradients D (t, o).

    ``linear_only`` turns False when some use is not a linear-weight use (a tied embedding): the intra
    variant then accumulates the parameter plainly.
    """

    X: list = field(default_factory=list)
    D: list = field(default_factory=list)
    linear_only: bool = True

    def add(self, c) -> None:
        factors = c.linear_factors()
        if factors is None:
            self.linear_only = False
        else:
            self.X.append(factors[0])
            self.D.append(factors[1])

    @property
    def usable(self) -> bool:
        """Every use was a linear-weight use, and there was at least one."""
        return self.linear_only and bool(self.X)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """X (t, i) and D (t, o) of all uses, tokens stacked."""
        if len(self.X) == 1:
            return self.X[0], self.D[0]   # one use: no copy
        return torch.cat(self.X), torch.cat(self.D)


@dataclass
class _Slot:
    """What has arrived for one parameter: its contributions, intra factors, and how many uses are pending."""

    pending: int = 0
    contribs: list = field(default_factory=list)
    intra: IntraFactors | None = None


class Collector:
    """Per-parameter contributions of one microbatch.

    Parameters
    ----------
    routes : {module name: [(attribute, entry)]} (:attr:`proma.inventory.Inventory.routes`).
    uses : the captured calls of the microbatch (their count per parameter is what completes it).
    collect_intra : also keep each parameter's :class:`IntraFactors` (``variant="intra"``).
    hold : entry -> bool, True for parameters to keep until :meth:`take` instead of completing.
    on_complete : callable(entry, contribs, intra factors or None), called when all of a parameter's uses
        have arrived.
    """

    def __init__(self, routes: dict, uses: list, *, collect_intra: bool, hold: Callable, on_complete: Callable):
        self._routes, self._hold, self._on_complete = routes, hold, on_complete
        self._collect_intra = collect_intra
        self._slots: dict = {}
        self.error: Exception | None = None
        for u in uses:
            for _, entry in routes.get(u.name, ()):
                self._slot(entry).pending += 1

    def _slot(self, entry) -> _Slot:
        slot = self._slots.get(entry)
        if slot is None:
            slot = self._slots[entry] = _Slot(intra=IntraFactors() if self._collect_intra else None)
        return slot

    def receive(self, use: Use) -> None:
        """The capture callback, run inside the backward pass; an error is kept and raised by :meth:`check`."""
        if self.error is not None:
            return
        try:
            entries = self._routes.get(use.name, ())
            names = tuple(attr for attr, _ in entries)
            contribs = use.rule.contributions(use.module, use.saved, use.grad_output, names) if names else {}
            for attr, entry in entries:
                slot = self._slot(entry)
                slot.contribs.append(contribs[attr])
                if slot.intra is not None:
                    slot.intra.add(contribs[attr])
                slot.pending -= 1
                if slot.pending == 0 and not self._hold(entry):
                    self._complete(entry)
        except Exception as exc:  # re-raised after the backward pass, with the engine unwound
            self.error = exc
        finally:
            use.saved = use.grad_output = None

    def _complete(self, entry) -> None:
        slot = self._slots.pop(entry)
        if slot.contribs:
            self._on_complete(entry, slot.contribs, slot.intra)

    def check(self) -> None:
        """Raise the error a callback met during the backward pass, if any."""
        if self.error is not None:
            raise self.error

    def take(self, entry) -> list:
        """The contributions that arrived for a held parameter (empty when none did); forgets them."""
        slot = self._slots.pop(entry, None)
        return [] if slot is None else slot.contribs

    def finish(self, entries: list) -> None:
        """Complete, in ``entries`` order, every parameter that still has contributions.

        A use whose output gradient never arrived (the call's output did not reach the loss) leaves its
        parameter pending; what did arrive is applied here.
        """
        for entry in entries:
            if entry in self._slots:
                self._complete(entry)


def _floating_tensors(contribution) -> list:
    """The floating-point tensors a contribution holds (factors, per-sequence gradients)."""
    return [v for v in vars(contribution).values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def non_finite_factors(contribs: list) -> bool:
    """Whether any contribution holds a NaN or inf (only asked after an update failed: a pass over the factors)."""
    return any(not bool(torch.isfinite(t).all()) for c in contribs for t in _floating_tensors(c))


class Transaction:
    """The new running gradients of one microbatch, written to ``p.grad`` only once every parameter succeeded.

    An update runs on a copy of the parameter's running gradient (:meth:`base`), so that a failure in any later
    parameter (a NaN that arises in the backward pass reaches the layers nearer the input last) leaves every
    ``p.grad`` as it was before the microbatch. Cost: one extra copy of the running gradients until
    :meth:`commit`, and one finiteness reduction per parameter, read back once per device.
    """

    def __init__(self):
        self._items: list = []   # (entry, new G, record)

    @staticmethod
    def base(grads, param: torch.Tensor) -> torch.Tensor | None:
        """A copy of ``param``'s running gradient (None when it is zero) for an update to work on in place."""
        G = grads.running(param)
        return None if G is None else G.clone()

    def add(self, entry, G: torch.Tensor, record) -> None:
        self._items.append((entry, G, record))

    def _non_finite(self) -> list:
        """Names of the parameters whose new G holds a NaN or inf (one host read per device when none does).

        The quick test is the sum of each G: a NaN or inf in G makes it NaN or inf, so a finite sum proves G
        finite, in one read of G without a mask; only when some sum is not (a non-finite entry, or a sum of
        finite entries that overflows) is every element tested."""
        by_device: dict = {}
        for entry, G, _ in self._items:
            by_device.setdefault(G.device, []).append(G.sum(dtype=torch.float64) if G.dtype != torch.float64
                                                      else G.sum())
        if all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values()):
            return []
        return [entry.name for entry, G, _ in self._items if not bool(torch.isfinite(G).all())]

    def commit(self, grads, stats: dict) -> None:
        """Write every new G (``grads.store``) and its record into ``stats``; or, when some new G is not finite,
        raise a ValueError naming its parameter and write nothing."""
        bad = self._non_finite()
        if bad:
            more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})" \
                if len(bad) > 1 else ""
            self._items = []
            raise ValueError(f"parameter {bad[0]!r}{more}: this microbatch's update is not finite (NaN or inf in its "
                             "per-sequence gradients, Gram or inner products, arisen in the backward pass, or in "
                             "p.grad itself); the microbatch was rejected and no p.grad was changed")
        for entry, G, record in self._items:
            grads.store(entry.param, G)
            stats[entry.name] = (entry.rule_label, record)
        self._items = []


def check_microbatch(seq_logp, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """``seq_logp`` (b,) checked, and ``weights`` as a finite (b,) floating tensor on its device.

    Raises
    ------
    ValueError naming the argument at fault (type, shape, NaN / inf, no gradient).
    """
    if not isinstance(seq_logp, torch.Tensor):
        raise ValueError(f"seq_logp must be a torch.Tensor of shape (b,); got {type(seq_logp).__name__}")
    if seq_logp.dim() != 1:
        raise ValueError(f"seq_logp must have shape (b,) (one value per sequence); got {tuple(seq_logp.shape)}")
    if not seq_logp.requires_grad and seq_logp.shape[0] > 0:
        raise ValueError("seq_logp does not require grad; compute it from the model with gradients enabled")
    w = torch.as_tensor(weights)
    if w.dim() != 1 or w.shape[0] != seq_logp.shape[0]:
        raise ValueError(f"weights must have shape ({seq_logp.shape[0]},) to match seq_logp; got {tuple(w.shape)}")
    if not w.is_floating_point():
        w = w.double()
    w = w.detach().to(seq_logp.device)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights contain NaN or inf")
    if not bool(torch.isfinite(seq_logp.detach()).all()):
        raise ValueError("seq_logp contains NaN or inf")
    return seq_logp, w


def captured_uses(capture, b: int) -> list:
    """The calls ``capture`` hooked since the last backward; raises unless there is one and each has dim 0 = b."""
    uses = list(capture.uses)
    if not uses:
        raise ValueError("backward: no hooked module call was captured since the last backward; run the "
                         "model forward with gradients enabled (and not inside paused()) first")
    for u in uses:
        if u.b != b:
            capture.discard()
            raise ValueError(f"seq_logp has {b} sequences but module {u.name!r} was called with dim 0 = "
                             f"{u.b}; dim 0 of every activation must index the sequences")
    return uses
