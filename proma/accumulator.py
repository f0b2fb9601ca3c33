"""``ProjectedAccumulator``: layer-wise PROMA inside one backward pass per microbatch.

Index conventions: b sequences of a microbatch, m microbatches, P flattened size of one parameter tensor.

For every trainable parameter tensor (block) and microbatch m, with g_i the gradient of sequence i's total
log-probability restricted to the block and w_i its loss weight::

    pg_m = sum_i w_i g_i
    G_m  = G_{m-1} - shrinkage * R_m + pg_m          (G_0 = 0, G lives in p.grad)

``variant="proma"``: R_m is the component of G_{m-1} in span{g_i : i in m} (``solver="exact"``) or the
published approximations (``"gram_schmidt"``, ``"ridge"``), capped by ``relative_bound``; see
:mod:`proma.projection`. ``variant="none"``: R_m = 0 (it runs ``(weights * seq_logp).sum().backward()``).
``variant="intra"``: every ``nn.Linear`` weight adds its microbatch gradient projected against the dominant
subspaces of its own activations and output gradients (:func:`proma.projection.intra_project`); every other
parameter adds pg_m.

The g_i are never formed for the whole model. One backward pass of ``seq_logp.sum()`` delivers each hooked
call's output gradients D (:mod:`proma.capture`); as soon as all uses of a parameter have arrived its
:class:`~proma.layers.Block` gives the b x b Gram, the inner products with G and a single weighted update,
and its captured factors are released. Parameter gradients are not computed by autograd at all.

Shared parameters (tied embedding / output head) and modules called several times: the block's g_i sum
every use, and its Gram holds every cross term. Intra variant: a Linear weight used several times stacks
the tokens of all its uses (X rows and D rows together); a weight that also has a non-Linear use (a tied
embedding) gets plain accumulation.

Precision: the per-layer algebra runs in the parameter dtype (float32 for bf16/fp16 parameters), the b x b
solves in float64. For 16-bit parameters the running gradient lives in a float32 buffer owned by the
accumulator; after every ``backward`` each ``p.grad`` is set to that buffer rounded to the parameter dtype.

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
  and the exchanged buffer exists W + 1 times; every rank computes the blocks of all B sequences.

Call :meth:`synchronize` after the last microbatch, before ``optimizer.step()`` (it is a no-op in one
process). With ``DistributedDataParallel`` run the forwards and ``backward`` inside ``model.no_sync()``
(or :func:`proma.distributed.no_sync`) so that gradients are not reduced twice.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed as pdist
from .capture import Capture, Use
from .layers import STRATEGIES, Block, OuterFactors, find_rule, work_dtype_for
from .layers.block import DEFAULT_MAX_TRANSIENT
from .projection import SOLVERS, intra_project, solve

VARIANTS = ("proma", "none", "intra")
SYNCS = ("local", "global")
INTRA_FORMS = ("two_sided", "kron")


@dataclass
class _Param:
    """Bookkeeping of one trainable parameter (state owned by the accumulator, never set on the tensor)."""

    name: str
    param: nn.Parameter
    owners: list                 # [(module name, attribute)] holding the parameter
    rule: str                    # rule name(s), "excluded"
    excluded: bool = False
    pending: int = 0             # uses still expected in the running backward
    contribs: list = field(default_factory=list)
    intra_X: list = field(default_factory=list)
    intra_D: list = field(default_factory=list)
    intra_ok: bool = True        # every use is an nn.Linear weight use


class ProjectedAccumulator:
    """Accumulate microbatch policy gradients into ``p.grad`` with layer-wise PROMA.

    Parameters
    ----------
    model : nn.Module
        The model; dim 0 of its activations indexes sequences.
    variant : {"proma", "none", "intra"}
    solver : {"exact", "gram_schmidt", "ridge"}
        Projection of ``variant="proma"`` (see :mod:`proma.projection`).
    passes : int >= 1, Gram-Schmidt sweeps.  ridge : float > 0, ridge regulariser.
    relative_bound : float >= 0 or None
        Cap ``||R_m|| <= relative_bound * ||pg_m||`` per parameter tensor.
    shrinkage : float, multiplier of the removed component.
    intra_rank : int >= 0, intra_form : {"two_sided", "kron"}
        Options of ``variant="intra"``.
    strategy : {"auto", "materialize", "ghost"}
        Route for the per-layer Gram (see :mod:`proma.layers.block`); "auto" picks per layer by cost.
    exclude : iterable of str
        Names (as in ``model.named_parameters()``) of trainable parameters that get plain accumulation.
        A parameter without a layer rule must be listed here; without a rule its microbatch gradient costs
        one extra backward pass restricted to the path to those parameters.
    max_transient : int
        Largest number of elements of a materialised per-sequence gradient chunk.
    process_group : torch.distributed process group or None
        Ranks to average over; default the world group when torch.distributed is initialised (else one
        process, and :meth:`synchronize` does nothing).
    sync : {"local", "global"}
        ``variant="proma"`` across ranks: project against each rank's own microbatches ("local") or
        against the union of every rank's k-th microbatch ("global"; see the module docstring).

    Examples
    --------
    >>> acc = ProjectedAccumulator(model, variant="proma", solver="exact")     # doctest: +SKIP
    >>> acc.zero_grad()
    >>> for batch, weights in microbatches:
    ...     acc.backward(seq_logprobs(model, batch), weights)
    >>> acc.synchronize()                  # across ranks; a no-op in one process
    >>> optimizer.step()
    """

    def __init__(self, model: nn.Module, variant: str = "proma", solver: str = "exact", passes: int = 2,
                 ridge: float = 1e-2, relative_bound: float | None = None, shrinkage: float = 1.0,
                 intra_rank: int = 1, intra_form: str = "two_sided", strategy: str = "auto",
                 exclude=(), max_transient: int = DEFAULT_MAX_TRANSIENT, process_group=None,
                 sync: str = "local"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        if solver not in SOLVERS + ("none",):
            raise ValueError(f"solver must be one of {SOLVERS + ('none',)}; got {solver!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
        if sync not in SYNCS:
            raise ValueError(f"sync must be one of {SYNCS}; got {sync!r}")
        if sync == "global" and variant == "intra":
            raise ValueError("sync='global' is defined for variant='proma' (intra projects each microbatch on its "
                             "own, so each rank projects its own microbatches); use sync='local'")
        if intra_form not in INTRA_FORMS:
            raise ValueError(f"intra_form must be one of {INTRA_FORMS}; got {intra_form!r}")
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be an int >= 1; got {passes!r}")
        if isinstance(intra_rank, bool) or not isinstance(intra_rank, int) or intra_rank < 0:
            raise ValueError(f"intra_rank must be an int >= 0; got {intra_rank!r}")
        if not (math.isfinite(float(ridge)) and float(ridge) > 0):
            raise ValueError(f"ridge must be a finite float > 0; got {ridge!r}")
        if relative_bound is not None and not (math.isfinite(float(relative_bound)) and relative_bound >= 0):
            raise ValueError(f"relative_bound must be None or a finite float >= 0; got {relative_bound!r}")
        if not math.isfinite(float(shrinkage)):
            raise ValueError(f"shrinkage must be a finite float; got {shrinkage!r}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.model = model
        self.variant, self.solver, self.passes, self.ridge = variant, solver, passes, float(ridge)
        self.relative_bound = None if relative_bound is None else float(relative_bound)
        self.shrinkage, self.intra_rank, self.intra_form = float(shrinkage), intra_rank, intra_form
        self.strategy, self.max_transient = strategy, int(max_transient)
        self.exclude = frozenset(exclude)
        self._params = self._inventory()
        self.sync = sync
        self._group = pdist.default_group(process_group)
        self.world_size = pdist.world_size(self._group)
        # lockstep exchange only when it changes anything: PROMA across several ranks
        self._global = sync == "global" and variant == "proma" and self.world_size > 1
        self._ledger = pdist.CommLedger()
        self._model_sig = pdist.signature([(p.name, tuple(p.param.shape), str(p.param.dtype))
                                           for p in self._params.values()])
        self._options_sig = pdist.signature(variant, sync, solver, passes, self.ridge, self.relative_bound,
                                            self.shrinkage, intra_rank, intra_form, sorted(self.exclude))
        self._buffers: dict = {}          # fp32 running gradient of 16-bit parameters
        self._written: dict = {}          # p.grad tensor we last wrote for a 16-bit parameter
        self._stats: dict = {}
        self._microbatches = 0
        self._weights = None
        self._error = None
        self._capture = None
        self._by_module: dict = {}
        if variant != "none":
            hooked = {mname: self._modules[mname] for p in self._params.values() if p.rule != "excluded"
                      for mname, _ in p.owners}
            self._capture = Capture(hooked, on_grad=self._on_grad)

    # -- setup ---------------------------------------------------------------------------------------
    def _inventory(self) -> dict:
        """Trainable parameters, their owning modules and rules; raises for a parameter without a rule.

        Modules are identified by their first qualified name (a module registered under several names is
        hooked once); a parameter held by several modules (tied weights) lists every owner.
        """
        self._modules = {}
        canonical = {}
        for mname, module in self.model.named_modules():
            canonical[id(module)] = mname
            self._modules[mname] = module
        owners: dict = {}
        for module in self._modules.values():
            for attr, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), []).append((canonical[id(module)], attr, module))
        names, tensors = {}, {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                names[id(p)], tensors[id(p)] = n, p
        unknown = self.exclude - set(names.values())
        if unknown:
            raise ValueError(f"exclude names no trainable parameter: {sorted(unknown)}")
        params = {}
        for pid, name in names.items():
            own = sorted(set((m, a) for m, a, _ in owners[pid]))
            rules, covered = set(), True
            for mname, attr in own:
                module = self._modules[mname]
                rule = find_rule(module)
                if rule is None or attr not in rule.param_names(module):
                    covered = False
                else:
                    rules.add(rule.name)
            excluded = name in self.exclude
            if not covered and not excluded and self.variant != "none":  # plain backward needs no rule
                where = ", ".join(f"{m or '<model>'}.{a} ({type(self._modules[m]).__name__})" for m, a in own)
                raise ValueError(
                    f"trainable parameter {name!r} has no PROMA layer rule (used as {where}); register a "
                    "rule (proma.layers.register) or pass it in exclude= for plain accumulation")
            params[pid] = _Param(name=name, param=tensors[pid], owners=own,
                                 rule="+".join(sorted(rules)) if covered else "excluded", excluded=excluded)
        return params

    # -- public API ----------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Start a new accumulation: every trainable parameter's ``.grad`` is set to None."""
        for p in self._params.values():
            p.param.grad = None
        self._buffers.clear()
        self._written.clear()
        self._microbatches = 0
        self._ledger.reset()
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
        if not self._global:
            self._backward(seq_logp, weights)
            return
        self._exchanged = False
        try:
            self._backward(seq_logp, weights)
        except BaseException:
            if not self._exchanged:  # let the other ranks raise too instead of waiting in the exchange
                with contextlib.suppress(Exception):
                    pdist.exchange_header([pdist.PHASE_ERROR, self._microbatches, self._model_sig,
                                           self._options_sig], self._group, pdist.comm_device(self._group),
                                          self._ledger)
            raise

    def _backward(self, seq_logp, weights) -> None:
        seq_logp, w = self._check_inputs(seq_logp, weights)
        if seq_logp.shape[0] == 0:
            # nothing to add; the layer rules need not handle empty activations
            if self._capture is not None:
                self._capture.discard()
            self._stats = {}
            if self._global:
                self._weights = w.double()
                for p in self._params.values():
                    p.contribs = []
                self._exchange_and_process(0)
            self._microbatches += 1
            return
        if self.variant == "none":
            (w.to(seq_logp.dtype) * seq_logp).sum().backward()
            self._stats = {p.name: {"rule": p.rule, "strategy": "plain", "mode": "plain"}
                           for p in self._params.values()}
            self._microbatches += 1
            return
        b = seq_logp.shape[0]
        cap = self._capture
        uses = list(cap.uses)
        if not uses:
            raise ValueError("backward: no hooked module call was captured since the last backward; run the "
                             "model forward with gradients enabled (and not inside paused()) first")
        for u in uses:
            if u.b != b:
                cap.discard()
                raise ValueError(f"seq_logp has {b} sequences but module {u.name!r} was called with dim 0 = "
                                 f"{u.b}; dim 0 of every activation must index the sequences")
        self._weights = w.double()
        self._stats = {}
        self._error = None
        by_module = {}
        for p in self._params.values():
            p.pending, p.contribs, p.intra_X, p.intra_D, p.intra_ok = 0, [], [], [], True
            if p.rule == "excluded":
                continue
            for mname, attr in p.owners:
                by_module.setdefault(mname, []).append((attr, p))
        self._by_module = by_module
        for u in uses:
            for attr, p in by_module.get(u.name, ()):
                p.pending += 1
        plain_grads = self._excluded_grads(seq_logp, w)
        try:
            cap.backward(seq_logp)
            if self._error is not None:
                raise self._error
            if self._global:
                self._exchange_and_process(b)
            else:
                for p in self._params.values():
                    if p.contribs or p.intra_X:
                        self._process(p)
        finally:
            for p in self._params.values():
                p.contribs, p.intra_X, p.intra_D, p.pending = [], [], [], 0
            self._by_module = {}
        for p, g in plain_grads:
            self._add_to_grad(p, g, mode="plain (no rule)")
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
        params = {}
        for name, s in self._stats.items():
            d = dict(s)
            for k in ("removed_norm", "incoming_norm"):
                if k in d and isinstance(d[k], torch.Tensor):
                    d[k] = float(d[k])
            if "removed_norm" in d:
                d["removed_ratio"] = d["removed_norm"] / d["incoming_norm"] if d["incoming_norm"] > 0 else 0.0
            params[name] = d
        proj = [d for d in params.values() if d.get("mode") in ("proma", "intra")]
        rem = math.sqrt(sum(d["removed_norm"] ** 2 for d in proj))
        inc = math.sqrt(sum(d["incoming_norm"] ** 2 for d in proj))
        summary = {
            "removed_norm": rem, "incoming_norm": inc, "removed_ratio": rem / inc if inc > 0 else 0.0,
            "projected": len(proj),
            "plain": sum(1 for d in params.values() if d.get("mode", "").startswith("plain")),
            "excluded": sum(1 for p in self._params.values() if p.excluded),
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
        gradient on every rank keeps ``grad = None``. No-op in a single process. A collective: every rank
        must call it.
        """
        if self.world_size == 1:
            return
        device = pdist.comm_device(self._group)
        headers = pdist.exchange_header([pdist.PHASE_SYNC, self._microbatches, self._model_sig, self._options_sig],
                                        self._group, device, self._ledger)
        pdist.check_headers(headers, require_same_count=self._global)
        todo = [p for p in self._params.values()
                if not self._global or p.excluded or p.rule == "excluded"]
        if not todo:
            return
        pairs = []
        for p in todo:
            G = self._running(p)
            if G is None:
                G = torch.zeros(p.param.shape, dtype=work_dtype_for(p.param.dtype), device=p.param.device)
            pairs.append((p, G))
        # how many ranks hold a gradient, so that a parameter no rank touched keeps grad None (optimizers skip it)
        has = torch.tensor([float(p.param.grad is not None) for p in todo], dtype=pairs[0][1].dtype,
                           device=pairs[0][1].device)
        pdist.all_reduce_mean_([G for _, G in pairs] + [has], self._group, self._ledger)
        for (p, G), h in zip(pairs, has.tolist()):
            if h > 0:
                self._store(p, G)
            else:
                p.param.grad = None

    def comm_stats(self) -> dict:
        """Communication by this rank since ``zero_grad``, next to a plain gradient all-reduce.

        Returns
        -------
        dict with ``world_size``, ``collectives``, ``payload_bytes`` (input tensors, padding included),
        ``wire_bytes`` (bytes sent with ring algorithms), ``allreduce_payload_bytes`` / ``allreduce_wire_bytes``
        (one all-reduce of every trainable parameter's gradient in its dtype, what DDP sends per step).
        """
        grad_bytes = sum(p.param.numel() * p.param.element_size() for p in self._params.values())
        out = {"world_size": self.world_size, **self._ledger.as_dict(), "allreduce_payload_bytes": grad_bytes,
               "allreduce_wire_bytes": pdist.all_reduce_wire_bytes(grad_bytes, self.world_size)}
        return out

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

    # -- internals -----------------------------------------------------------------------------------
    def _check_inputs(self, seq_logp, weights):
        if self.variant != "none" and self._capture is None:
            raise ValueError("backward: the accumulator is closed")
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

    def _excluded_grads(self, seq_logp, w):
        """Weighted gradients of excluded parameters without a rule (one extra, restricted, backward)."""
        todo = [p for p in self._params.values() if p.rule == "excluded"]
        if not todo:
            return []
        grads = torch.autograd.grad(seq_logp, [p.param for p in todo], grad_outputs=w.to(seq_logp.dtype),
                                    retain_graph=True, allow_unused=True)
        return [(p, g) for p, g in zip(todo, grads) if g is not None]

    def _on_grad(self, use: Use) -> None:
        """Called inside the backward pass when a use's D arrives; processes completed parameters."""
        if self._error is not None:
            return
        try:
            entries = self._by_module.get(use.name, ())
            names = tuple(attr for attr, _ in entries)
            contribs = use.rule.contributions(use.module, use.saved, use.grad_output, names) if names else {}
            for attr, p in entries:
                c = contribs[attr]
                p.contribs.append(c)
                if self.variant == "intra":
                    if isinstance(c, OuterFactors) and c.is_linear_weight:
                        p.intra_X.append(c.B.reshape(-1, c.B.shape[-1]))
                        p.intra_D.append(c.A.reshape(-1, c.A.shape[-1]))
                    else:
                        p.intra_ok = False
                p.pending -= 1
                # sync="global" keeps the contributions until every rank's have been exchanged
                if p.pending == 0 and (not self._global or p.excluded):
                    self._process(p)
        except Exception as exc:  # re-raised after the backward pass, with the engine unwound
            self._error = exc
        finally:
            use.saved = use.grad_output = None

    def _exchange_and_process(self, b: int) -> None:
        """sync="global": send this rank's factors, receive every rank's, apply the global microbatch's update.

        Every rank builds the same blocks over the B = sum_r b_r sequences (ranks in order) and runs the
        same solve on them, so the running gradients stay equal on every rank without an all-reduce.
        """
        device = pdist.comm_device(self._group)
        order = [p for p in self._params.values() if p.rule != "excluded" and not p.excluded]
        packer = pdist.Packer()
        packer.add(-1, 0, pdist.KIND_WEIGHTS, b, 0, 0, self._weights)
        for k, p in enumerate(order):
            for u, c in enumerate(p.contribs):
                pdist.pack_contribution(packer, k, u, c, work_dtype_for(p.param.dtype))
            p.contribs = []  # the buffer holds a copy
        buf = packer.finish(device)
        headers = pdist.exchange_header([pdist.PHASE_BACKWARD, self._microbatches, self._model_sig, self._options_sig,
                                         b, len(packer.meta), buf.numel()], self._group, device, self._ledger)
        self._exchanged = True
        pdist.check_headers(headers, require_same_count=True)
        bufs = pdist.all_gather_bytes(buf, [h[6] for h in headers], self._group, self._ledger)
        del buf, packer
        weights, pieces = [], {}
        for r, (rbuf, h) in enumerate(zip(bufs, headers)):
            for k, u, piece in pdist.unpack(rbuf, h[5]):
                if k < 0:
                    weights.append(piece.tensors[0].to(device=self._weights.device, dtype=torch.float64))
                elif piece.b > 0:
                    pieces.setdefault(k, {}).setdefault(u, {})[r] = piece
        w = torch.cat(weights) / self.world_size
        with_seqs = [r for r, h in enumerate(headers) if h[4] > 0]
        for k, p in enumerate(order):
            uses = pieces.get(k)
            if not uses:
                continue
            for u, by_rank in uses.items():
                if sorted(by_rank) != with_seqs:
                    raise ValueError(f"ranks disagree on the calls of parameter {p.name!r}: use {u} arrived on ranks "
                                     f"{sorted(by_rank)} of the ranks with sequences {with_seqs}")
            work = work_dtype_for(p.param.dtype)
            contribs = [pdist.merge_pieces([uses[u][r] for r in with_seqs], p.param.shape, work, p.param.device)
                        for u in sorted(uses)]
            self._process(p, contribs, w)

    def _running(self, p: _Param):
        """The running gradient G of p (work dtype) or None when it is zero / unset."""
        g = p.param.grad
        if g is None:
            self._buffers.pop(id(p.param), None)
            return None
        if p.param.dtype in (torch.float16, torch.bfloat16):
            buf = self._buffers.get(id(p.param))
            if buf is None or self._written.get(id(p.param)) is not g:
                buf = g.float()  # p.grad was set outside the accumulator: take it as G
                self._buffers[id(p.param)] = buf
            return buf
        return g

    def _store(self, p: _Param, G: torch.Tensor) -> None:
        if p.param.dtype in (torch.float16, torch.bfloat16):
            self._buffers[id(p.param)] = G
            p.param.grad = G.to(p.param.dtype)
            self._written[id(p.param)] = p.param.grad
        elif p.param.grad is not G:
            p.param.grad = G

    def _add_to_grad(self, p: _Param, g: torch.Tensor, *, mode: str) -> None:
        G = self._running(p)
        work = work_dtype_for(p.param.dtype)
        G = g.to(work).clone() if G is None else G.add_(g.to(G.dtype))
        self._store(p, G)
        self._stats[p.name] = {"rule": p.rule, "strategy": "autograd", "mode": mode,
                               "incoming_norm": g.double().norm(), "removed_norm": torch.zeros((), dtype=torch.float64),
                               "gram_rank": None, "uses": 0}

    def _process(self, p: _Param, contribs=None, weights=None) -> None:
        """All uses of p have arrived: apply this microbatch's update to its running gradient.

        ``contribs`` and ``weights`` default to this rank's (the global microbatch's with sync="global").
        """
        if contribs is None:
            contribs, p.contribs = p.contribs, []
        if not contribs:
            return
        work = work_dtype_for(p.param.dtype)
        block = Block(contribs, strategy=self.strategy, work_dtype=work, max_transient=self.max_transient)
        w = (self._weights if weights is None else weights).to(p.param.device)
        G = self._running(p)
        stat = {"rule": p.rule, "strategy": block.strategy, "gram_rank": None, "uses": len(contribs)}
        try:
            if p.excluded or self.variant == "intra":
                if self.variant == "intra" and not p.excluded and p.intra_ok and p.intra_X:
                    X, D = torch.cat(p.intra_X), torch.cat(p.intra_D)
                    keep = (D != 0).any(dim=1)   # tokens without output gradient (padding) carry nothing
                    pg = block.weighted_sum(w)
                    new = intra_project(pg, X[keep].to(work), D[keep].to(work), rank=self.intra_rank,
                                        form=self.intra_form)
                    stat.update(mode="intra", strategy="factored", incoming_norm=pg.double().norm(),
                                removed_norm=(pg - new).double().norm())
                else:
                    new = block.weighted_sum(w)
                    why = "plain (excluded)" if p.excluded else "plain (intra projects nn.Linear weights only)"
                    stat.update(mode=why, strategy="factored", incoming_norm=new.double().norm(),
                                removed_norm=torch.zeros((), dtype=torch.float64))
                G = new if G is None else G.add_(new)
            elif G is None or self.solver == "none":
                # G = 0 (or solver "none") removes nothing: the update is pg alone and no Gram is needed
                pg = block.weighted_sum(w)
                stat.update(mode="proma", incoming_norm=pg.double().norm(),
                            removed_norm=torch.zeros((), dtype=torch.float64))
                G = pg if G is None else G.add_(pg)
            else:
                K, h = block.gram_and_inner(G)
                # the b x b solve is tiny and full of data-dependent branches: run it on the CPU in float64
                # (one device->host copy per block instead of many small kernels and synchronisations)
                sol = solve(K.cpu(), h.cpu(), w.cpu(), solver=self.solver, passes=self.passes, ridge=self.ridge,
                            relative_bound=self.relative_bound, P=block.P, work_dtype=work)
                block.add_weighted_(G, (w.cpu() - self.shrinkage * sol.coef).to(G.device))
                stat.update(mode="proma", incoming_norm=sol.incoming_norm, removed_norm=sol.removed_norm,
                            gram_rank=sol.rank)
            self._store(p, G)
            self._stats[p.name] = stat
        finally:
            block.release()
            p.intra_X, p.intra_D = [], []
