"""``ProjectedAccumulator``: layer-wise PROMA inside one backward pass per microbatch.

Index conventions: b sequences of a microbatch, m microbatches, P flattened size of one parameter tensor.

For every trainable parameter tensor (block) and microbatch m, with g_i the gradient of sequence i's total
log-probability restricted to the block and w_i its loss weight::

    pg_m = sum_i w_i g_i
    G_m  = G_{m-1} - shrinkage * R_m + pg_m          (G_0 = 0, G lives in p.grad)

``variant="proma"``: R_m is the component of G_{m-1} in span{g_i : i in m} (``solver="exact"``) or the
published approximations (``"gram_schmidt"``, ``"ridge"``), capped by ``relative_bound``; see
:mod:`proma.solvers` (declared in :mod:`reference.solvers`). ``variant="none"``: R_m = 0 (it runs ``(weights * seq_logp).sum().backward()``).
``variant="intra"``: every ``nn.Linear`` weight adds its microbatch gradient projected against the dominant
subspaces of its own activations and output gradients (``updates.IntraUpdate``: :func:`proma.subspace.dominant_subspace`
and :func:`proma.intra.project_factored_`); every other
parameter adds pg_m.

The g_i are never formed for the whole model. One backward pass of ``seq_logp.sum()`` delivers each hooked
call's output gradients D (:mod:`proma.capture`); as soon as all uses of a parameter have arrived its
:class:`~proma.layers.Block` gives the b x b Gram, the inner products with G and a single weighted update,
and its captured factors are released. Parameter gradients are not computed by autograd at all.

Shared parameters (tied embedding / output head) and modules called several times: the block's g_i sum
every use, and its Gram holds every cross term. Intra variant: a Linear weight used several times stacks
the tokens of all its uses (X rows and D rows together); a weight that also has a non-Linear use (a tied
embedding) gets plain accumulation.

Precision (the one place that states it): per-sequence gradients, factors, updates and the running gradient
are in the work dtype (the parameter's, float32 for bf16/fp16 parameters); the b x b Gram is formed in float64
on both routes (:data:`proma.layers.block.GRAM_DTYPE`); the inner products h_i = <g_i, G> are float64 on the
materialize route and in the work dtype on the ghost route; the b x b solves run in float64
(:mod:`proma.solvers`). For 16-bit parameters the running gradient lives in a float32 buffer owned by the
accumulator; after every ``backward`` each ``p.grad`` is set to that buffer rounded to the parameter dtype.

The life of a microbatch, ``acc.backward(seq_logp, w)``, file by file: docs/accumulator.md ("The life of a
microbatch").

Transactional: a microbatch that fails (bad inputs, a NaN or inf arising in the backward pass, a solver error on
non-finite factors) raises a ValueError naming the parameter, leaves every ``p.grad`` as it was before it and
releases its captured calls, so the caller may skip it and go on. The price is one extra copy of the running
gradients while a microbatch is in flight and one host read of a finiteness flag per device. No autograd graph
is recorded on ``p.grad`` (the updates after the backward pass run under ``torch.no_grad``).

Data parallelism (torch.distributed; ``process_group``, default the world group when initialised; W ranks).
Convention: every mode gives the *mean over ranks*, as DDP does, so each rank passes the weights it would
use alone (e.g. ``-A_i / N_rank``), and with ``sync="global"`` the result is (1/W) x single-process PROMA
on the union microbatches (PROMA is homogeneous in the weights, so this equals PROMA with weights w / W).

- ``variant="none"`` / ``"intra"``: each rank accumulates its own microbatches; :meth:`synchronize`
  averages p.grad over the ranks (one all-reduce). Intra equals single-process intra over all ranks'
  microbatches (as separate microbatches) with weights w / W.
- ``variant="proma", sync="local"``: each rank runs PROMA over its own microbatches, then
  :meth:`synchronize` averages (no extra communication; not single-process PROMA on the unions).
- ``variant="proma", sync="global"``: lockstep; at microbatch k every rank sends its per-layer factors
  (:mod:`proma.distributed`) and every rank projects the replicated global G against the union of the
  k-th microbatches. Equals ``reference.accumulate`` on the unions with weights w / W. :meth:`synchronize`
  then only averages the excluded parameters and checks that every rank ran as many microbatches.
  Memory: the factors of every layer are kept to the end of the backward pass (not freed layer by layer)
  and one exchange round's buffer exists W + 1 times; every rank computes the blocks of all B sequences.

FSDP2 (``fully_shard`` on the decoder layers and the root; :mod:`proma.fsdp`, docs/fsdp.md): the same modes and
results; the running gradients are kept unsharded by the accumulator (``p.grad`` stays None meanwhile) and
:meth:`synchronize` writes every ``p.grad`` as a ``DTensor`` sharded like its parameter (a reduce-scatter, or
this rank's rows of the replicated G of ``sync="global"``); ``variant="none"`` then also runs through the hooks.

Call :meth:`synchronize` after the last microbatch, before ``optimizer.step()`` (it is a no-op in one
process without FSDP2). With ``DistributedDataParallel`` run the forwards and ``backward`` inside ``model.no_sync()``
(or :func:`proma.distributed.no_sync`) so that gradients are not reduced twice.

The parts, one job each: :mod:`proma.options` (validated options, presets), :mod:`proma.inventory` (which
parameter is handled how), :mod:`proma.capture` (hooks), :mod:`proma.microbatch` (contributions collected
during the backward pass), :mod:`proma.updates` (project / intra / plain), :mod:`proma.grad_store`
(``p.grad`` and 16-bit buffers), :mod:`proma.distributed` (the protocol across ranks).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .capture import Capture
from .distributed import RankSync
from .fsdp import FsdpRoute, check_current, reshard
from .grad_store import GradStore
from .inventory import Handling, Inventory, ParamEntry
from .layers import Block
from .microbatch import Collector, IntraFactors, Transaction, captured_uses, check_microbatch, non_finite_factors
from .options import NO_SOLVER, AccumulatorOptions
from .updates import PlainUpdate, Updates


def _ignore(use) -> None:
    """Capture callback while no microbatch is being collected."""


class ProjectedAccumulator:
    """Accumulate microbatch policy gradients into ``p.grad`` with layer-wise PROMA.

    Parameters
    ----------
    model : nn.Module
        The model; dim 0 of its activations indexes sequences.
    options : AccumulatorOptions, optional
        Every option below at once (e.g. :data:`proma.options.PUBLISHED`); not combined with keywords.
    variant, solver, passes, ridge, relative_bound, shrinkage, intra_rank, intra_form, strategy, exclude,
    max_transient, sync
        As :class:`proma.options.AccumulatorOptions`. A parameter without a layer rule must be listed in
        ``exclude``; its microbatch gradient then costs one extra backward pass restricted to the path to it.
    process_group : torch.distributed process group or None
        Ranks to average over; default the world group when torch.distributed is initialised (else one
        process, and :meth:`synchronize` does nothing).

    Examples
    --------
    >>> acc = ProjectedAccumulator(model, variant="proma", solver="exact")     # doctest: +SKIP
    >>> acc.zero_grad()
    >>> for batch, weights in microbatches:
    ...     acc.backward(seq_logprobs(model, batch), weights)
    >>> acc.synchronize()                  # across ranks; a no-op in one process
    >>> optimizer.step()
    """

    def __init__(self, model: nn.Module, *, options: AccumulatorOptions | None = None, process_group=None,
                 **keywords):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if options is not None and keywords:
            raise ValueError(f"pass options= or keyword options, not both; got options= and {sorted(keywords)}")
        self.options = options if options is not None else AccumulatorOptions(**keywords)
        self.model = model
        reshard(model)   # FSDP2: the sharded parameters are the ones to know (the root stays unsharded after a forward)
        self._inventory = Inventory(model, self.options.exclude, require_rules=self.options.variant != "none")
        self._sync = RankSync(process_group, self._inventory.signature_items(), self.options.signature_items())
        self.world_size = self._sync.world_size
        # lockstep exchange only when it changes anything: PROMA across several ranks
        self._global = self.options.sync == "global" and self.options.variant == "proma" and self.world_size > 1
        self._fsdp = self._fsdp_route(model)
        self._grads = GradStore() if self._fsdp is None else self._fsdp.store
        # under FSDP2 variant "none" also goes through the hooks (PROMA that removes nothing), so that p.grad
        # never depends on FSDP's own gradient sync state (accelerate runs every microbatch inside no_sync)
        self._hooked = self.options.variant != "none" or self._fsdp is not None
        plain_via_hooks = self.options.variant == "none" and self._hooked
        self._updates = Updates(self.options.replace(variant="proma", solver=NO_SOLVER) if plain_via_hooks
                                else self.options)
        self._stats: dict = {}          # name -> (rule label, UpdateRecord) of the last microbatch
        self._microbatches = 0
        self._capture = None
        self._transaction = Transaction()   # the microbatch in flight's staged updates
        if self._hooked:
            self._capture = Capture(self._inventory.hooked_modules(), on_grad=_ignore)

    # -- public API ----------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Start a new accumulation: every trainable parameter's ``.grad`` is set to None."""
        check_current(self.model, self._inventory.entries, self._inventory.modules)
        for e in self._inventory.entries:
            e.param.grad = None
        self._grads.clear()
        self._microbatches = 0
        self._sync.ledger.reset()
        if self._capture is not None:
            self._capture.discard()

    @contextlib.contextmanager
    def paused(self):
        """Forwards run inside this context are not captured (evaluation with gradients enabled)."""
        if self._capture is None:
            yield
        else:
            with self._capture.paused():
                yield

    def backward(self, seq_logp: torch.Tensor, weights) -> None:
        """Accumulate one microbatch.

        Parameters
        ----------
        seq_logp : (b,) tensor with grad: total log-probability of each sequence's scored tokens, from a
            forward of the model run since the last ``backward``.
        weights : (b,) per-sequence loss weights w_i (tensor, array or sequence): the microbatch's loss is
            ``sum_i w_i * seq_logp_i``.

        A microbatch without sequences (b = 0; ``seq_logp`` need not require grad) adds nothing. With
        ``sync="global"`` on several ranks this is a collective: every rank must call it once per microbatch,
        so a rank without sequences at step k calls ``acc.backward(torch.zeros(0), torch.zeros(0))``.
        """
        lockstep = self._sync.lockstep(self._microbatches) if self._global else contextlib.nullcontext()
        with lockstep as step:
            if self._hooked and self._capture is None:
                raise ValueError("backward: the accumulator is closed")
            try:
                seq_logp, w = check_microbatch(seq_logp, weights)
                self._stats = {}
                if seq_logp.shape[0] == 0:
                    self._empty_microbatch(w, step)
                elif not self._hooked:
                    self._plain_backward(seq_logp, w)
                else:
                    uses = captured_uses(self._capture, seq_logp.shape[0])
                    self._accumulate(seq_logp, w, uses, step)
            except BaseException:
                # a rejected microbatch leaves nothing behind: p.grad is as before it (the updates were only
                # staged, see Transaction), and its captured calls go so the next forward starts afresh
                if self._capture is not None:
                    self._capture.discard()
                raise
        self._microbatches += 1

    def stats(self) -> dict:
        """Diagnostics of the last microbatch.

        Returns
        -------
        dict with
            ``"params"``: {parameter name: {"rule", "strategy", "mode", "removed_norm", "incoming_norm",
            "removed_ratio", "gram_rank", "uses"}} (norms as floats; ``removed_norm`` is ||R|| after the
            cap, before shrinkage; ``incoming_norm`` is ||pg||; ``gram_rank`` is None when G was zero and no
            Gram was needed), and
            ``"summary"``: {"removed_norm", "incoming_norm", "removed_ratio" (over all projected
            parameters, norms combined as the norm of the concatenation), "projected", "plain",
            "excluded", "microbatches"}.
        """
        params = {name: record.as_dict(rule) for name, (rule, record) in self._stats.items()}
        proj = [params[name] for name, (_, record) in self._stats.items() if record.projected]
        rem = math.sqrt(sum(d["removed_norm"] ** 2 for d in proj))
        inc = math.sqrt(sum(d["incoming_norm"] ** 2 for d in proj))
        summary = {
            "removed_norm": rem, "incoming_norm": inc, "removed_ratio": rem / inc if inc > 0 else 0.0,
            "projected": len(proj),
            "plain": sum(1 for d in params.values() if d["mode"].startswith("plain")),
            "excluded": len(self.options.exclude),
            "microbatches": self._microbatches,
        }
        return {"params": params, "summary": summary}

    def synchronize(self) -> None:
        """Finish the step across ranks: call once after the last microbatch, before ``optimizer.step()``.

        Averages ``p.grad`` over the ranks (one all-reduce per dtype): every parameter for ``sync="local"``
        and the variants "none" and "intra"; with ``sync="global"`` only the excluded parameters (the
        projected ones are already global and equal on every rank). First checks, with one small
        all-gather, that the ranks agree on the model and the options (and, for ``sync="global"``, on the
        number of microbatches); raises the same ValueError on every rank otherwise. A parameter without a
        gradient on every rank keeps ``grad = None``. Under FSDP2 every ``p.grad`` becomes a ``DTensor`` shard
        (:meth:`proma.fsdp.FsdpRoute.finish`). No-op in a single process without FSDP2. A collective: every rank
        must call it.
        """
        if self.world_size == 1 and self._fsdp is None:
            return
        if self.world_size > 1:
            self._sync.check_agreement(self._microbatches, same_count=self._global)
        inv = self._inventory
        todo = inv.with_handling(Handling.EXCLUDED_CAPTURED, Handling.AUTOGRAD_PLAIN) if self._global \
            else inv.entries
        if self._fsdp is None:
            self._grads.average_([e.param for e in todo], self._sync.average_)
        else:
            replicated = inv.with_handling(Handling.RULE) if self._global else []
            self._fsdp.finish([e.param for e in todo], [e.param for e in replicated], self._sync.ledger)

    def comm_stats(self) -> dict:
        """Communication by this rank since ``zero_grad``, next to a plain gradient all-reduce.

        Returns
        -------
        dict with ``world_size``, ``collectives``, ``payload_bytes`` (input tensors, padding included),
        ``wire_bytes`` (bytes sent with ring algorithms), ``allreduce_payload_bytes`` / ``allreduce_wire_bytes``
        (one all-reduce of every trainable parameter's gradient in its dtype, what DDP sends per step).
        """
        return self._sync.comm_stats(sum(e.param.numel() * e.param.element_size() for e in self._inventory.entries))

    def close(self) -> None:
        """Remove every hook; the model is left as it was. Idempotent."""
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _fsdp_route(self, model: nn.Module) -> FsdpRoute | None:
        """The FSDP2 route when the parameters are ``fully_shard`` DTensors (:mod:`proma.fsdp`), else None."""
        no_rule = [e.name for e in self._inventory.with_handling(Handling.AUTOGRAD_PLAIN)]
        route = FsdpRoute.detect(model, self._inventory.entries, no_rule)
        if route is not None and route.world_size != self.world_size:
            raise ValueError(f"the FSDP2 mesh has {route.world_size} ranks but the accumulator's process group has "
                             f"{self.world_size}; pass process_group=mesh.get_group()")
        return route

    # -- the steps of backward -----------------------------------------------------------------------
    def _empty_microbatch(self, w: torch.Tensor, step) -> None:
        """b = 0 adds nothing (the layer rules need not handle empty activations); under the lockstep the
        rank still takes part in the exchange and applies the other ranks' sequences."""
        if self._capture is not None:
            self._capture.discard()
        if step is not None:
            self._transaction = Transaction()
            with torch.no_grad():
                self._exchange(step, w.double(), 0, take=lambda e: [])
                self._transaction.commit(self._grads, self._stats)

    def _plain_backward(self, seq_logp: torch.Tensor, w: torch.Tensor) -> None:
        """variant "none": the gradient of the microbatch's loss ``sum_i w_i seq_logp_i`` added to ``p.grad`` (as
        ``backward()`` would), once every parameter's is known to be finite."""
        entries = self._inventory.entries
        # backward() into emptied .grad (torch.autograd.grad would not pass reentrant checkpoints), then the old
        # gradients are put back and the new ones added only if they are all finite
        kept = [e.param.grad for e in entries]
        for e in entries:
            e.param.grad = None
        try:
            (w.to(seq_logp.dtype) * seq_logp).sum().backward()
            grads = [e.param.grad for e in entries]
        finally:
            for e, g in zip(entries, kept):
                e.param.grad = g
        reached = [(e, g) for e, g in zip(entries, grads) if g is not None]
        if reached and not bool(torch.stack([torch.isfinite(g).all() for _, g in reached]).all()):
            bad = [e.name for e, g in reached if not bool(torch.isfinite(g).all())]
            raise ValueError(f"parameter {bad[0]!r}: this microbatch's gradient is not finite (NaN or inf arisen in "
                             "the backward pass); the microbatch was rejected and no p.grad was changed")
        for e, g in reached:
            e.param.grad = g if e.param.grad is None else e.param.grad.add_(g)
        self._stats = {e.name: (e.rule_label, PlainUpdate.backward_record()) for e in entries}

    def _accumulate(self, seq_logp: torch.Tensor, w: torch.Tensor, uses: list, step) -> None:
        """One backward pass to the taps; each parameter is updated as soon as its uses are complete."""
        w64 = w.double()
        self._transaction = Transaction()
        no_rule = self._no_rule_grads(seq_logp, w)
        collector = Collector(self._inventory.routes, uses, collect_intra=self.options.variant == "intra",
                              hold=lambda e: step is not None and e.handling is Handling.RULE,
                              on_complete=lambda e, contribs, intra: self._apply(e, contribs, w64, intra))
        self._capture.on_grad = collector.receive
        try:
            self._capture.backward(seq_logp)
        finally:
            self._capture.on_grad = _ignore
        collector.check()
        # after the backward pass, as inside it, no graph is recorded: the updates that run here (the exchange, a
        # use whose gradient never arrived) would otherwise build one on p.grad from the saved activations
        with torch.no_grad():
            if step is not None:
                self._exchange(step, w64, seq_logp.shape[0], take=collector.take)
            collector.finish(self._inventory.captured())
            for e, g in no_rule:
                G, record = PlainUpdate.add_gradient(g, Transaction.base(self._grads, e.param), e.work_dtype)
                self._transaction.add(e, G, record)
            self._transaction.commit(self._grads, self._stats)   # p.grad is written here, or not at all

    def _no_rule_grads(self, seq_logp: torch.Tensor, w: torch.Tensor) -> list:
        """Weighted gradients of the parameters without a rule (one extra, restricted, backward)."""
        todo = self._inventory.with_handling(Handling.AUTOGRAD_PLAIN)
        if not todo:
            return []
        grads = torch.autograd.grad(seq_logp, [e.param for e in todo], grad_outputs=w.to(seq_logp.dtype),
                                    retain_graph=True, allow_unused=True)
        return [(e, g) for e, g in zip(todo, grads) if g is not None]

    def _exchange(self, step, w64: torch.Tensor, b: int, take) -> None:
        """sync="global": exchange the projected parameters' factors (``take(entry)`` gives this rank's) and
        apply the global microbatch."""
        entries = self._inventory.with_handling(Handling.RULE)
        held = [(e.name, e.param, take(e)) for e in entries]
        w_global, merged = step.exchange(w64, b, held)
        for k, contribs in merged:
            self._apply(entries[k], contribs, w_global)

    def _apply(self, entry: ParamEntry, contribs: list, w: torch.Tensor, intra: IntraFactors | None = None) -> None:
        """All uses of a parameter have arrived: apply the microbatch's update to its running gradient."""
        block = Block(contribs, strategy=self.options.strategy, work_dtype=entry.work_dtype,
                      max_transient=self.options.max_transient)
        try:
            # staged: the update works on a copy of G, written to p.grad by the transaction's commit
            G, record = self._updates.apply(entry.handling, block, w.to(entry.param.device),
                                            Transaction.base(self._grads, entry.param), intra)
            self._transaction.add(entry, G, record)
        except Exception as exc:
            # a NaN that arises in the backward pass can make a solver fail (eigh: "failed to converge"): say so
            if non_finite_factors(contribs):
                raise ValueError(f"parameter {entry.name!r}: its per-sequence gradients in this microbatch contain "
                                 "NaN or inf (arisen in the backward pass); the microbatch was rejected and no "
                                 "p.grad was changed") from exc
            raise
        finally:
            block.release()
