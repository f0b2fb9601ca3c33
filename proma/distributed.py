"""Data-parallel PROMA: process groups, the wire format of contributions, collectives and byte accounting.

Index conventions: W ranks, b_r sequences of rank r's microbatch, B = sum_r b_r sequences of the global
microbatch, n tokens per sequence, o x i parameter (P elements).

Everything here is plumbing for :class:`proma.ProjectedAccumulator` (``process_group=``, ``sync=``); the
maths stays in :mod:`proma.layers` and :mod:`proma.solvers`. :class:`RankSync` is the protocol of one
accumulator: headers with named fields (:class:`Header`), the lockstep exchange of ``sync="global"``
(:class:`LockstepStep`), the final average and the byte ledger.

``sync="global"`` needs, at microbatch k and for every parameter, the B x B Gram of the union of every
rank's k-th microbatch. Its cross blocks ``<g_i^r, g_j^s>`` (r != s) cannot be formed from Grams or inner
products computed on one rank, so each rank sends, per use of a parameter, the cheaper of

- its token factors: the rows of X (b_r, n, i) and D (b_r, n, o) of the tokens whose D row is non-zero
  (padding and unreached positions carry nothing), at most ``b_r n (i + o)`` numbers, with an X shared by
  several layers (q, k, v; gate, up) sent once; for an embedding the ids and the rows of D, or
- the materialised per-sequence gradients of that one parameter, ``b_r P`` numbers (norm scales, biases,
  and linear weights whose ``n (i + o) > P``, i.e. long sequences through a small layer),

never a per-sequence copy of the whole model's gradient. Every rank then holds the same global block and
computes the same K, h, solve and update (G stays replicated, so no gradient all-reduce is needed at all).
A microbatch costs two collectives per round (parameters travel in rounds of at most
:data:`EXCHANGE_ROUND_ELEMENTS` elements; one round for small models): an all-gather of a fixed 8-integer header
(which also checks that the ranks agree on the model, the options and the microbatch count) and one all-gather
of one flat byte buffer holding the round's pieces (padded to the largest rank's buffer); the format is
:mod:`proma.wire`.

Under FSDP2 (``fully_shard``) the same protocol runs unchanged; :mod:`proma.fsdp` keeps the running
gradients and writes the sharded ``p.grad`` at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from .layers import work_dtype_for
# the wire format lives in proma.wire; re-exported here, where the protocol that uses it is described
from .wire import KIND_WEIGHTS, Packer, Piece, merge_pieces, pack_contribution, unpack  # noqa: F401

# -- process groups ------------------------------------------------------------------------------------

def default_group(process_group=None):
    """The group to use: ``process_group``, else the world group when torch.distributed is initialised, else None."""
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world_size(group) -> int:
    """Number of ranks of ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Device the collectives' tensors live on: the current CUDA device for NCCL, the CPU otherwise."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def signature(*items) -> int:
    """A 63-bit hash of ``repr(items)``, equal on every rank for equal items (Python's ``hash`` is salted)."""
    digest = hashlib.blake2b(repr(items).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def no_sync(model):
    """``model.no_sync()`` for a ``DistributedDataParallel`` model, a no-op context for any other module.

    Run every microbatch's forward and ``acc.backward`` inside it: the accumulator reduces gradients itself
    (in :meth:`~proma.ProjectedAccumulator.synchronize`, or through the global projection), and DDP would
    otherwise expect parameter gradients from a backward pass that does not produce them.
    """
    sync = getattr(model, "no_sync", None)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and sync is not None:
        with sync():
            yield
    else:
        yield


# -- byte accounting -----------------------------------------------------------------------------------

def all_reduce_wire_bytes(nbytes: int, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: ``2 (W - 1) / W * nbytes``."""
    return 2.0 * (world - 1) / world * nbytes if world > 1 else 0.0


def reduce_scatter_wire_bytes(nbytes: int, world: int) -> float:
    """Bytes one rank sends in a ring reduce-scatter of ``nbytes`` (input size): ``(W - 1) / W * nbytes``."""
    return (world - 1) / world * nbytes if world > 1 else 0.0


def all_gather_wire_bytes(nbytes_each: int, world: int) -> float:
    """Bytes one rank sends in a ring all-gather of ``nbytes_each`` per rank: ``(W - 1) * nbytes_each``."""
    return float((world - 1) * nbytes_each)


@dataclass
class CommLedger:
    """What this rank put into collectives since the last :meth:`reset`.

    ``payload_bytes`` counts the input tensors (padding included); ``wire_bytes`` estimates what the rank
    sends with ring algorithms (the standard cost model for gloo and NCCL on W ranks).
    """

    collectives: int = 0
    payload_bytes: int = 0
    wire_bytes: float = 0.0

    def all_gather(self, nbytes_each: int, world: int) -> None:
        self.collectives += 1
        self.payload_bytes += nbytes_each
        self.wire_bytes += all_gather_wire_bytes(nbytes_each, world)

    def all_reduce(self, nbytes: int, world: int) -> None:
        self.collectives += 1
        self.payload_bytes += nbytes
        self.wire_bytes += all_reduce_wire_bytes(nbytes, world)

    def reduce_scatter(self, nbytes: int, world: int) -> None:
        self.collectives += 1
        self.payload_bytes += nbytes
        self.wire_bytes += reduce_scatter_wire_bytes(nbytes, world)

    def reset(self) -> None:
        self.collectives, self.payload_bytes, self.wire_bytes = 0, 0, 0.0

    def as_dict(self) -> dict:
        return {"collectives": self.collectives, "payload_bytes": self.payload_bytes, "wire_bytes": self.wire_bytes}


# -- the header: a small all-gather that also checks agreement ---------------------------------------

PHASE_BACKWARD, PHASE_SYNC, PHASE_ERROR = 1, 2, 3
PHASE_NAMES = {PHASE_BACKWARD: "backward", PHASE_SYNC: "synchronize", PHASE_ERROR: "an error"}


class Header(NamedTuple):
    """What every rank announces before a collective step (sent as HEADER_LEN int64)."""

    phase: int               # PHASE_BACKWARD, PHASE_SYNC or PHASE_ERROR
    microbatches: int        # microbatches this rank ran before this step
    model_sig: int           # signature of the trainable parameters' names, shapes and dtypes
    options_sig: int         # signature of the accumulator options
    sequences: int = 0       # b_r, sequences of this rank's microbatch (backward)
    pieces: int = 0          # wire pieces in this rank's buffer (backward)
    nbytes: int = 0          # bytes of this rank's buffer (backward)
    reserved: int = 0        # pads the header to a fixed 8 x int64


HEADER_LEN = len(Header._fields)


def exchange_header(header: Header, group, device, ledger: CommLedger) -> list[Header]:
    """All-gather every rank's header; returns one :class:`Header` per rank."""
    world = world_size(group)
    mine = torch.tensor(list(header), dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    ledger.all_gather(mine.numel() * mine.element_size(), world)
    return [Header(*t.cpu().tolist()) for t in out]


def check_headers(headers: list[Header], *, require_same_count: bool) -> None:
    """Raise the same ValueError on every rank when the ranks disagree (every rank sees every header)."""
    for r, h in enumerate(headers):
        if h.phase == PHASE_ERROR:
            raise ValueError(f"rank {r} failed in ProjectedAccumulator.backward (see its own traceback); "
                             "every rank stops")
    first = headers[0]
    for r, h in enumerate(headers[1:], start=1):
        if h.model_sig != first.model_sig:
            raise ValueError(f"ranks disagree on the model: trainable parameter names, shapes or dtypes of "
                             f"rank {r} differ from rank 0's")
        if h.options_sig != first.options_sig:
            raise ValueError(f"ranks disagree on the accumulator options (variant, sync, solver, passes, ridge, "
                             f"relative_bound, shrinkage, exclude): rank {r} differs from rank 0")
    phases = {h.phase for h in headers}
    counts = {h.microbatches for h in headers}
    if len(phases) > 1 or (require_same_count and len(counts) > 1):
        where = ", ".join(f"rank {r}: {PHASE_NAMES.get(h.phase, h.phase)} after {h.microbatches} microbatches"
                          for r, h in enumerate(headers))
        raise ValueError("ranks disagree on the number of microbatches (sync='global' steps through "
                         f"microbatches in lockstep: every rank must call backward equally often): {where}")


# -- collectives ---------------------------------------------------------------------------------------

def all_gather_bytes(buf: torch.Tensor, sizes: list[int], group, ledger: CommLedger) -> list[torch.Tensor]:
    """All-gather a 1-D uint8 buffer whose length on rank r is ``sizes[r]`` (padded to the largest)."""
    world = world_size(group)
    top = max(sizes)
    padded = buf   # the largest rank sends its buffer as it is (no second copy)
    if buf.numel() < top:
        padded = torch.zeros(top, dtype=torch.uint8, device=buf.device)
        padded[:buf.numel()] = buf
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    ledger.all_gather(top, world)
    return [t[:s] for t, s in zip(out, sizes)]


def all_reduce_mean_(tensors: list[torch.Tensor], group, ledger: CommLedger) -> None:
    """Replace every tensor by its mean over the ranks, with one all-reduce per (dtype, device)."""
    world = world_size(group)
    buckets: dict = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        ledger.all_reduce(flat.numel() * flat.element_size(), world)
        flat.div_(world)
        start = 0
        for t in ts:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()


# -- the protocol of one accumulator ---------------------------------------------------------------------

WEIGHTS_PARAM = -1  # parameter index of the piece that carries a rank's loss weights


class RankSync:
    """The data-parallel protocol of one :class:`proma.ProjectedAccumulator`: agreement checks, the lockstep
    exchange of ``sync="global"``, the final average, and the byte ledger.

    Parameters
    ----------
    process_group : group to average over (default: the world group when torch.distributed is initialised).
    model_items, option_items : what every rank must agree on (hashed into each header).
    """

    def __init__(self, process_group, model_items, option_items):
        self.group = default_group(process_group)
        self.world_size = world_size(self.group)
        self.ledger = CommLedger()
        self._signatures = (signature(model_items), signature(*option_items))

    def headers(self, phase: int, microbatches: int, **fields) -> list[Header]:
        """Exchange this rank's header for ``phase`` (``fields``: sequences, pieces, nbytes)."""
        header = Header(phase, microbatches, *self._signatures, **fields)
        return exchange_header(header, self.group, comm_device(self.group), self.ledger)

    def check_agreement(self, microbatches: int, *, same_count: bool) -> None:
        """At synchronize: the ranks agree on the model and options (and on the microbatch count)."""
        check_headers(self.headers(PHASE_SYNC, microbatches), require_same_count=same_count)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace every tensor by its mean over the ranks."""
        all_reduce_mean_(tensors, self.group, self.ledger)

    @contextlib.contextmanager
    def lockstep(self, microbatches: int):
        """One ``sync="global"`` microbatch: yields a :class:`LockstepStep`. If this rank fails before its
        header went out, it sends an error header, so that the other ranks raise instead of waiting."""
        step = LockstepStep(self, microbatches)
        try:
            yield step
        except BaseException:
            if not step.exchanged:
                with contextlib.suppress(Exception):
                    self.headers(PHASE_ERROR, microbatches)
            raise

    def comm_stats(self, grad_bytes: int) -> dict:
        """The ledger next to a plain all-reduce of ``grad_bytes`` (see ``ProjectedAccumulator.comm_stats``)."""
        return {"world_size": self.world_size, **self.ledger.as_dict(), "allreduce_payload_bytes": grad_bytes,
                "allreduce_wire_bytes": all_reduce_wire_bytes(grad_bytes, self.world_size)}


# Parameters (by element count, the same on every rank) exchanged per round of a global microbatch: a round
# packs, sends and applies its parameters before the next is packed, so the copies of the factors in flight
# are bounded by one round's instead of the whole model's (small models take one round).
EXCHANGE_ROUND_ELEMENTS = 1 << 22


def exchange_rounds(held: list) -> list[list[int]]:
    """Consecutive groups of indices into ``held`` of at most :data:`EXCHANGE_ROUND_ELEMENTS` parameter
    elements each (one group at least); equal on every rank, since the ranks hold the same model."""
    rounds, cur, size = [], [], 0
    for k, (_, param, _) in enumerate(held):
        if cur and size + param.numel() > EXCHANGE_ROUND_ELEMENTS:
            rounds.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += param.numel()
    return rounds + [cur]


class LockstepStep:
    """The exchange of one global microbatch (``exchanged`` tells whether this rank's header went out)."""

    def __init__(self, sync: RankSync, microbatches: int):
        self.sync, self.microbatches = sync, microbatches
        self.exchanged = False

    def exchange(self, weights: torch.Tensor, b: int, held: list) -> tuple[torch.Tensor, Iterator]:
        """Send this rank's weights and factors, receive every rank's.

        Every rank builds the same blocks over the B = sum_r b_r sequences (ranks in order) and runs the
        same solve on them, so the running gradients stay equal on every rank without an all-reduce. The
        parameters travel in rounds (:func:`exchange_rounds`); the first round, with the weights, runs here,
        the others while the returned iterator is consumed (every rank must consume it to the end).

        Parameters
        ----------
        weights : (b,) float64 loss weights of this rank's microbatch.
        b : sequences of this rank's microbatch.
        held : [(name, parameter, contributions)], in the same order on every rank; each contributions
            list is emptied once packed (the buffer holds a copy).

        Returns
        -------
        w : (B,) float64 global weights, divided by W.
        merged : iterator of (index into ``held``, contributions over the B sequences), one parameter at a
            time (parameters no rank has sequences for are skipped).
        """
        rounds = exchange_rounds(held)
        pieces, headers, rank_weights = self._round(held, rounds[0], b, weights)
        with_seqs = [r for r, h in enumerate(headers) if h.sequences > 0]
        return torch.cat(rank_weights) / self.sync.world_size, self._merged_rounds(held, rounds, pieces, with_seqs, b)

    def _merged_rounds(self, held: list, rounds: list, pieces: dict, with_seqs: list, b: int) -> Iterator:
        yield from _merged(held, rounds[0], pieces, with_seqs)
        for ks in rounds[1:]:
            pieces, _, _ = self._round(held, ks, b)
            yield from _merged(held, ks, pieces, with_seqs)

    def _round(self, held: list, ks: list, b: int, weights: torch.Tensor | None = None):
        """Pack ``held[k]`` for k in ``ks`` (and the weights), exchange: (pieces by k, use, rank; headers; weights)."""
        sync = self.sync
        packer = Packer()
        if weights is not None:
            packer.add(WEIGHTS_PARAM, 0, KIND_WEIGHTS, b, 0, 0, weights)
        for k in ks:
            _, param, contribs = held[k]
            for u, c in enumerate(contribs):
                pack_contribution(packer, k, u, c, work_dtype_for(param.dtype))
            contribs.clear()
        buf = packer.finish(comm_device(sync.group))
        headers = sync.headers(PHASE_BACKWARD, self.microbatches, sequences=b, pieces=len(packer.meta),
                               nbytes=buf.numel())
        self.exchanged = True
        check_headers(headers, require_same_count=True)
        bufs = all_gather_bytes(buf, [h.nbytes for h in headers], sync.group, sync.ledger)
        del buf, packer
        rank_weights, pieces = [], {}
        for r, (rbuf, h) in enumerate(zip(bufs, headers)):
            for k, u, piece in unpack(rbuf, h.pieces):
                if k == WEIGHTS_PARAM:
                    rank_weights.append(piece.tensors[0].to(device=weights.device, dtype=torch.float64))
                elif piece.b > 0:
                    pieces.setdefault(k, {}).setdefault(u, {})[r] = piece
        return pieces, headers, rank_weights


def _merged(held: list, ks: list, pieces: dict, with_seqs: list) -> Iterator:
    """(k, the global contributions of held[k]) for every k in ``ks`` some rank sent pieces for."""
    for k in ks:
        name, param, _ = held[k]
        uses = pieces.get(k)
        if not uses:
            continue
        for u, by_rank in uses.items():
            if sorted(by_rank) != with_seqs:
                raise ValueError(f"ranks disagree on the calls of parameter {name!r}: use {u} arrived on ranks "
                                 f"{sorted(by_rank)} of the ranks with sequences {with_seqs}")
        work = work_dtype_for(param.dtype)
        yield k, [merge_pieces([uses[u][r] for r in with_seqs], param.shape, work, param.device) for u in sorted(uses)]
