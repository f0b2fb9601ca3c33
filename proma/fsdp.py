"""PROMA under FSDP2 (``torch.distributed.fsdp.fully_shard``): where the running gradients live, and the sharded
``p.grad`` written at the end of a step.

Index conventions: W ranks of the FSDP mesh, rank r; a parameter of N rows (dim 0) and R elements per row
(P = N R); c = ceil(N / W) rows per shard (FSDP2's ``torch.chunk`` layout: rank r holds rows
``[r c, min(N, (r + 1) c))``, possibly none).

What changes under FSDP2, and what does not:

- the hooks, the layer rules, the solvers and the ``sync="global"`` exchange run unchanged: FSDP unshards a
  unit's parameters for its forward and again for its backward, so every captured call sees ordinary
  tensors, and a parameter's factors are complete while its unit is unsharded;
- the running gradient G of each parameter (its global shape, in the work dtype) lives in
  :class:`ShardedGradStore`, not in ``p.grad``: a plain tensor cannot be the gradient of a sharded ``DTensor``
  parameter that an optimizer steps. ``p.grad`` stays None during the accumulation;
- :meth:`FsdpRoute.finish` (called by ``ProjectedAccumulator.synchronize``) writes ``p.grad`` as a ``DTensor``
  sharded like ``p`` and frees every G: for the parameters whose G differs per rank (``sync="local"``, intra,
  excluded parameters) one reduce-scatter (mean over ranks) per bucket of at most
  :data:`REDUCE_BUCKET_BYTES`; for those the global lockstep keeps replicated (``sync="global"``, projected
  parameters) this rank's rows of G, with no communication;
- ``variant="none"`` runs a plain backward and FSDP2 reduces the gradients itself (mean over ranks, sharded
  ``p.grad``); :meth:`FsdpRoute.finish` has nothing left to do.

Memory bound during accumulation (per rank): the unsharded G of every trainable parameter (one full gradient
in the work dtype), as plain FSDP2 accumulation with ``set_requires_gradient_sync(False)`` holds its
unsharded gradients; plus FSDP's one or two unsharded units and the capture's factors, as without FSDP.
At :meth:`FsdpRoute.finish` one bucket (<= ``REDUCE_BUCKET_BYTES`` plus its 1/W output) comes on top, while
each G is freed as soon as its bucket is packed.

Supported layout: a 1-D device mesh, every trainable parameter a ``DTensor`` placed ``(Shard(0),)`` (the
``fully_shard`` default). Anything else raises a ValueError naming the parameter: HSDP (a 2-D mesh with
``Replicate``), FSDP combined with tensor parallelism (2-D mesh), tensor parallelism alone (``DTensor``
parameters without any ``fully_shard``), a ``shard_placement_fn`` other than dim 0, trainable parameters left
outside ``fully_shard``, parameters without a layer rule (their extra autograd pass would need FSDP's private
unsharded parameters), and CPU offload (G would live on the compute device while ``p`` lives on the CPU).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .grad_store import GradStore
from .layers import work_dtype_for

# Largest reduce-scatter input at finish(): bounds the transient copy on top of the running gradients.
REDUCE_BUCKET_BYTES = 1 << 26


def _dtensor_types():
    """(DTensor, Shard, FSDPModule), or None when this torch build lacks them."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return None
    return DTensor, Shard, FSDPModule


def reshard(model) -> None:
    """Register the sharded parameters on every ``fully_shard`` module of ``model`` (no-op without FSDP2).

    After a forward (e.g. a generation) FSDP2 leaves the root's parameters unsharded, and the module then
    holds the unsharded tensors under the parameter names; the accumulator must know the sharded ``DTensor``
    parameters, which are the ones the optimizer steps.
    """
    types = _dtensor_types()
    if types is None:
        return
    for m in model.modules():
        if isinstance(m, types[2]):
            m.reshard()


def check_current(model, entries: list, modules: dict) -> None:
    """ValueError when a parameter the accumulator knows is no longer the one its module holds.

    ``fully_shard`` (or ``accelerator.prepare`` with FSDP2) replaces every parameter by a ``DTensor``: an
    accumulator built before that would write gradients to the old tensors, silently. ``entries`` are the
    inventory's (``name``, ``param``, ``owners``), ``modules`` its {module name: module}.
    """
    reshard(model)
    for e in entries:
        mname, attr = e.owners[0]
        if getattr(modules[mname], attr, None) is not e.param:
            raise ValueError(f"parameter {e.name!r} was replaced after ProjectedAccumulator was built (e.g. "
                             "fully_shard or accelerator.prepare applied afterwards); build the accumulator on "
                             "the final (sharded / wrapped) model")


class ShardedGradStore(GradStore):
    """Running gradients of FSDP2-sharded parameters: full-shape G per parameter, kept off ``p.grad``.

    Parameters
    ----------
    names : {id(parameter): name}, for errors.
    """

    def __init__(self, names: dict):
        super().__init__()
        self._names = names

    def running(self, param: torch.Tensor) -> torch.Tensor | None:
        """G of ``param`` (global shape, work dtype) or None when zero; ``p.grad`` must be None meanwhile."""
        if param.grad is not None:
            raise ValueError(
                f"parameter {self._names.get(id(param), '?')!r} has a .grad while ProjectedAccumulator accumulates "
                "under FSDP2: the running gradient is kept unsharded by the accumulator and written to p.grad by "
                "synchronize(); call acc.zero_grad() (or optimizer.zero_grad(set_to_none=True)) before the first "
                "microbatch of a step, and do not run backward again after synchronize() without it")
        return self.buffers.get(id(param))

    def store(self, param: torch.Tensor, G: torch.Tensor) -> None:
        if G.device != param.device:
            raise ValueError(
                f"parameter {self._names.get(id(param), '?')!r} lives on {param.device} but its gradient was "
                f"computed on {G.device}: FSDP2 CPU offload (OffloadPolicy) is not supported by "
                "ProjectedAccumulator; shard without offload")
        self.buffers[id(param)] = G

    def pop(self, param: torch.Tensor) -> torch.Tensor | None:
        """Take G of ``param`` out of the store (None when it never got one)."""
        return self.buffers.pop(id(param), None)


class FsdpRoute:
    """The FSDP2 side of one accumulator: the layout checks, the grad store and the final sharded ``p.grad``.

    Built by :meth:`detect`; ``world_size`` and ``rank`` are those of the FSDP mesh.
    """

    def __init__(self, mesh, names: dict):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.store = ShardedGradStore(names)

    @classmethod
    def detect(cls, model, entries: list, no_rule: list) -> "FsdpRoute | None":
        """The route for ``model`` when its trainable parameters are FSDP2 ``DTensor`` shards, else None.

        Parameters
        ----------
        model : the wrapped model.  entries : the inventory's entries (``name``, ``param``).
        no_rule : names of the trainable parameters that would need an extra autograd pass (no layer rule).

        Raises
        ------
        ValueError naming the parameter and the unsupported layout (see the module docstring).
        """
        types = _dtensor_types()
        if types is None:
            return None
        DTensor, Shard, FSDPModule = types
        sharded = [e for e in entries if isinstance(e.param, DTensor)]
        if not sharded:
            return None
        first = sharded[0]
        if not any(isinstance(m, FSDPModule) for m in model.modules()):
            raise ValueError(f"parameter {first.name!r} is a DTensor but no module of the model is wrapped with "
                             "fully_shard: tensor parallelism (parallelize_module) is not supported by "
                             "ProjectedAccumulator; shard with fully_shard on a 1-D mesh")
        plain = [e.name for e in entries if not isinstance(e.param, DTensor)]
        if plain:
            raise ValueError(f"trainable parameters {plain[:3]} are not sharded by fully_shard while others are; "
                             "wrap the root module with fully_shard as well")
        mesh = first.param.device_mesh
        for e in sharded:
            cls._check_layout(e, mesh, Shard)
        if no_rule:
            raise ValueError(f"parameters without a PROMA layer rule ({sorted(no_rule)[:3]}) are not supported "
                             "under FSDP2: their extra autograd pass would need FSDP's unsharded parameters; "
                             "register a rule (proma.layers.register) or freeze them")
        return cls(mesh, {id(e.param): e.name for e in entries})

    @staticmethod
    def _check_layout(e, mesh, Shard) -> None:
        p = e.param
        if p.device_mesh.ndim != 1:
            raise ValueError(f"parameter {e.name!r} lives on a {p.device_mesh.ndim}-D device mesh with placements "
                             f"{tuple(p.placements)}: HSDP (replicate + shard) and FSDP combined with tensor "
                             "parallelism are not supported by ProjectedAccumulator; use fully_shard on a 1-D mesh")
        if p.device_mesh != mesh:
            raise ValueError(f"parameter {e.name!r} is sharded on another device mesh than the first parameter's; "
                             "use one mesh for the whole model")
        if p.device.type != p.device_mesh.device_type:
            raise ValueError(f"parameter {e.name!r} lives on {p.device} while its mesh computes on "
                             f"{p.device_mesh.device_type}: FSDP2 CPU offload (OffloadPolicy) is not supported by "
                             "ProjectedAccumulator (the running gradients live on the compute device); shard "
                             "without offload")
        if tuple(p.placements) != (Shard(0),) or p.dim() == 0:
            raise ValueError(f"parameter {e.name!r} is placed as {tuple(p.placements)} with shape {tuple(p.shape)}; "
                             "ProjectedAccumulator supports FSDP2's default Shard(0) of tensors with dim >= 1 "
                             "(no shard_placement_fn)")

    # -- the end of a step -----------------------------------------------------------------------------------
    def _rows(self, param) -> tuple[int, int]:
        """(first row, row count) of this rank's shard of ``param``; checked against its local tensor."""
        n = param.shape[0]
        c = math.ceil(n / self.world_size)
        start = min(n, self.rank * c)
        count = min(n, start + c) - start
        local = param.to_local().shape
        if local[0] != count or tuple(local[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"parameter {self.store._names.get(id(param), '?')!r}: local shard {tuple(local)} is "
                             f"not rows [{start}, {start + count}) of {tuple(param.shape)} (FSDP2's chunk layout)")
        return start, count

    def _as_grad(self, param, local: torch.Tensor):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local.to(param.dtype).contiguous(), param.device_mesh, param.placements,
                                  run_check=False, shape=param.shape, stride=param.stride())

    def finish(self, mean: list, replicated: list, ledger) -> None:
        """Write every ``p.grad`` as a sharded ``DTensor`` and free the running gradients.

        Parameters
        ----------
        mean : parameters whose G differs per rank: ``p.grad`` = this rank's rows of the mean over ranks (a
            parameter without G on every rank keeps ``grad = None``; one that some rank holds counts as zero
            on the others).
        replicated : parameters whose G is equal on every rank: ``p.grad`` = this rank's rows of G.
        ledger : :class:`proma.distributed.CommLedger` that counts the collectives.
        """
        for p in replicated:
            G = self.store.pop(p)
            if G is not None:
                start, count = self._rows(p)
                p.grad = self._as_grad(p, G[start:start + count].clone())
        todo = self._held_somewhere(mean, ledger)
        bucket, size = [], 0
        for p in todo:
            G = self.store.pop(p)
            if G is None:
                G = torch.zeros(p.shape, dtype=work_dtype_for(p.dtype), device=p.device)
            if bucket and (G.dtype != bucket[0][1].dtype or size + G.numel() * G.element_size() > REDUCE_BUCKET_BYTES):
                self._reduce_scatter(bucket, ledger)
                size = 0
            bucket.append((p, G))
            size += G.numel() * G.element_size()
            del G
        if bucket:
            self._reduce_scatter(bucket, ledger)
        self.store.clear()

    def _held_somewhere(self, params: list, ledger) -> list:
        """The parameters some rank holds a G for (one small all-reduce of flags)."""
        if not params:
            return []
        has = torch.tensor([float(id(p) in self.store.buffers) for p in params], dtype=torch.float64,
                           device=params[0].device)
        if self.world_size > 1:
            dist.all_reduce(has, group=self.group)
            ledger.all_reduce(has.numel() * has.element_size(), self.world_size)
        for p, h in zip(params, has.tolist()):
            if h == 0:
                p.grad = None
        return [p for p, h in zip(params, has.tolist()) if h > 0]

    def _reduce_scatter(self, bucket: list, ledger) -> None:
        """Mean over ranks of the G of ``bucket`` [(p, G)], one reduce-scatter; sets each ``p.grad`` shard.

        The input holds, for each rank s in turn, rows ``[s c, (s + 1) c)`` of every G, zero-padded to c rows,
        so that rank s receives exactly its shards. Each G is copied in and freed (``bucket`` is emptied) before
        the next, so the transient is the input plus its 1/W output, not a second copy of every G.
        """
        W = self.world_size
        sizes = [math.ceil(p.shape[0] / W) * (G.numel() // max(p.shape[0], 1)) for p, G in bucket]
        section = sum(sizes)
        inp = bucket[0][1].new_zeros(W * section)
        params, offset = [], 0
        for size in sizes:
            p, G = bucket.pop(0)
            flat = G.reshape(-1)
            for s in range(W):
                piece = flat[s * size:(s + 1) * size]
                inp[s * section + offset:s * section + offset + piece.numel()].copy_(piece)
            params.append(p)
            offset += size
            del G, flat, piece
        out = inp.new_empty(section)
        if W > 1:
            dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, group=self.group)
            ledger.reduce_scatter(inp.numel() * inp.element_size(), W)
            out.div_(W)
        else:
            out.copy_(inp)
        del inp
        offset = 0
        for p, size in zip(params, sizes):
            _, count = self._rows(p)
            rows = out[offset:offset + size].view(-1, *p.shape[1:])[:count]
            p.grad = self._as_grad(p, rows.clone())
            offset += size
