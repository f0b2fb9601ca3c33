"""Data-parallel PROMA: process groups, the wire format of contributions, collectives and byte accounting.

Index conventions: W ranks, b_r sequences of rank r's microbatch, B = sum_r b_r sequences of the global
microbatch, n tokens per sequence, o x i parameter (P elements).

Everything here is plumbing for :class:`proma.ProjectedAccumulator` (``process_group=``, ``sync=``); the
maths stays in :mod:`proma.layers` and :mod:`proma.projection`. :class:`RankSync` is the protocol of one
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
A microbatch costs two collectives: an all-gather of a fixed 8-integer header (which also checks that the
ranks agree on the model, the options and the microbatch count) and one all-gather of one flat byte buffer
holding every parameter's pieces (padded to the largest rank's buffer).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from .layers import IdsFactors, OuterFactors, SeqGrads, work_dtype_for

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


# -- wire format of contributions ----------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)
KIND_FACTORS, KIND_IDS, KIND_DENSE, KIND_WEIGHTS = 0, 1, 2, 3
_FIXED = 6      # param, use, kind, b, n, flag
_SLOT_LEN = 3   # (dtype, offset, numel) of one tensor
_SLOTS = 3      # tensor slots per piece
META_LEN = _FIXED + _SLOT_LEN * _SLOTS
_INT64_BYTES = 8
# vocabularies up to this size send their ids as int32
INT32_IDS_LIMIT = 2 ** 31
_ALIGN = 8


class Packer:
    """Collects tensors into one flat byte buffer (each piece aligned to 8 bytes) plus integer metadata.

    A tensor put twice (the same storage, offset, shape and strides: e.g. the input X shared by the q, k
    and v projections, or by gate and up, selected by the same token mask) is stored once and referenced
    twice. Callers keep every tensor alive until :meth:`finish`, so an address cannot be reused meanwhile.
    """

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.size = 0
        self.meta: list[list[int]] = []
        self._seen: dict = {}

    def put(self, t: torch.Tensor, key=None) -> tuple[int, int, int]:
        """Store ``t`` (or find it stored under ``key``, default its memory layout); ``(dtype, offset, numel)``."""
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device) if key is None else key
        if key not in self._seen:
            self._seen[key] = self._copy(t)
        return self._seen[key]

    def _copy(self, t: torch.Tensor) -> tuple[int, int, int]:
        t = t.detach().contiguous().reshape(-1)
        raw = t.view(torch.uint8)
        offset = self.size
        pad = (-raw.numel()) % _ALIGN
        self.parts.append(raw)
        if pad:
            self.parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
        self.size += raw.numel() + pad
        return DTYPES.index(t.dtype), offset, t.numel()

    def add(self, param: int, use: int, kind: int, b: int, n: int, flag: int, *slots) -> None:
        """One piece; ``slots`` are tensors or ``(dtype, offset, numel)`` locations from :meth:`put`."""
        row = [param, use, kind, b, n, flag]
        for t in slots:
            row += list(self.put(t) if isinstance(t, torch.Tensor) else t)
        row += [0] * _SLOT_LEN * (_SLOTS - len(slots))
        self.meta.append(row)

    def finish(self, device) -> torch.Tensor:
        """``[meta (int64, pieces x META_LEN)] [pieces]`` as one uint8 tensor on ``device``."""
        meta = torch.tensor(self.meta, dtype=torch.int64).reshape(-1)
        head = meta.view(torch.uint8).to(device)
        return torch.cat([head] + [p.to(device) for p in self.parts])


def _token_keep(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose output gradient row is non-zero, (b, n) bool, and their count per sequence (b,).

    Tokens with D_t = 0 (padding, and positions the loss does not reach) contribute nothing to g_i, K or h,
    so only the others travel; the receiver packs each sequence's tokens to the front (token order within a
    sequence does not matter for sums over tokens).
    """
    keep = (A != 0).any(dim=-1)
    return keep, keep.sum(dim=1)


def pack_contribution(packer: Packer, param: int, use: int, c, work_dtype: torch.dtype) -> int:
    """Add one use's contribution in its cheaper wire form; returns the number of elements sent."""
    if isinstance(c, (OuterFactors, IdsFactors)):
        rows_factor = c.A if isinstance(c, OuterFactors) else c.B
        keep, counts = _token_keep(rows_factor)
        t = int(counts.sum())
        n = int(counts.max()) if c.b else 0
        if isinstance(c, IdsFactors):
            ids = c.ids if c.shape[0] >= INT32_IDS_LIMIT else c.ids.to(torch.int32)
            packer.add(param, use, KIND_IDS, c.b, n, 0, counts.to(torch.int32), ids[keep], c.B[keep])
            return c.b + t * (1 + c.shape[1])
        o, i = c.shape
        if t * (o + i) <= c.b * o * i:
            # X is shared by several projections (q, k, v; gate, up): store it once per token selection
            loc = packer.put(c.B[keep], key=("X", c.B.data_ptr(), tuple(c.B.shape), c.B.stride(),
                                             keep.cpu().numpy().tobytes()))
            packer.add(param, use, KIND_FACTORS, c.b, n, int(c.is_linear_weight), counts.to(torch.int32),
                       c.A[keep], loc)
            return c.b + t * (o + i)
        g = c.materialize(0, o, work_dtype)
        packer.add(param, use, KIND_DENSE, c.b, 0, 0, g)
        return g.numel()
    if isinstance(c, SeqGrads):
        packer.add(param, use, KIND_DENSE, c.b, 0, 0, c.g)
        return c.g.numel()
    raise ValueError(f"sync='global' cannot send a contribution of type {type(c).__name__}; the layer rule must "
                     "return OuterFactors, IdsFactors or SeqGrads")


@dataclass
class Piece:
    """One rank's wire form of one use: ``kind``, ``b``, ``n`` (longest kept sequence), ``flag``, tensors."""

    kind: int
    b: int
    n: int
    flag: int
    tensors: list


def unpack(buf: torch.Tensor, pieces: int) -> list[tuple[int, int, Piece]]:
    """Inverse of :class:`Packer` for one rank's buffer: ``[(param, use, Piece)]`` (views into ``buf``)."""
    nmeta = pieces * META_LEN * _INT64_BYTES
    meta = buf[:nmeta].clone().view(torch.int64).reshape(pieces, META_LEN).tolist() if pieces else []
    body = buf[nmeta:]
    used = {KIND_FACTORS: 3, KIND_IDS: 3, KIND_DENSE: 1, KIND_WEIGHTS: 1}
    out = []
    for row in meta:
        param, use, kind, b, n, flag = row[:_FIXED]
        tensors = []
        for k in range(used[kind]):
            code, offset, numel = row[_FIXED + _SLOT_LEN * k: _FIXED + _SLOT_LEN * (k + 1)]
            dtype = DTYPES[code]
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            tensors.append(body[offset:offset + nbytes].view(dtype))
        out.append((param, use, Piece(kind, b, n, flag, tensors)))
    return out


def _unpack_tokens(counts: torch.Tensor, rows: torch.Tensor, n: int, device) -> torch.Tensor:
    """Kept token rows (t, d) of b sequences with ``counts`` -> (b, n, d), each sequence's rows at the front."""
    counts = counts.to(device=device, dtype=torch.int64)
    b = counts.numel()
    out = torch.zeros((b, n) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    seq = torch.repeat_interleave(torch.arange(b, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(seq.numel(), device=device) - starts[seq]
    out[seq, pos] = rows.to(device)
    return out


def merge_pieces(pieces: list[Piece], shape: torch.Size, work_dtype: torch.dtype, device):
    """One use's contribution over the B sequences of the global microbatch, ranks in order.

    Ranks that sent factors are concatenated along the sequence dimension (tokens zero-padded to the longest
    kept sequence of any rank); when some rank sent materialised gradients, the others' factors are
    materialised too.
    """
    shape = torch.Size(shape)
    pieces = [p for p in pieces if p.b > 0]
    if not pieces:
        raise ValueError("merge_pieces needs at least one rank with sequences")
    kinds = {p.kind for p in pieces}
    n = max(p.n for p in pieces)

    def tokens(p, k, width):
        return _unpack_tokens(p.tensors[0], p.tensors[k].reshape(-1, *width), n, device)

    if kinds == {KIND_IDS}:
        ids = torch.cat([tokens(p, 1, ()).to(torch.int64) for p in pieces])
        B = torch.cat([tokens(p, 2, (shape[1],)) for p in pieces])
        return IdsFactors(ids, B, shape[0])
    if kinds == {KIND_FACTORS}:
        A = torch.cat([tokens(p, 1, (shape[0],)) for p in pieces])
        B = torch.cat([tokens(p, 2, (shape[1],)) for p in pieces])
        return OuterFactors(A, B, is_linear_weight=bool(pieces[0].flag))
    if kinds <= {KIND_FACTORS, KIND_DENSE}:
        dense = []
        for p in pieces:
            if p.kind == KIND_DENSE:
                dense.append(p.tensors[0].reshape(p.b, *shape).to(device=device, dtype=work_dtype))
            else:
                f = OuterFactors(tokens(p, 1, (shape[0],)), tokens(p, 2, (shape[1],)))
                dense.append(f.materialize(0, shape[0], work_dtype))
        return SeqGrads(torch.cat(dense))
    raise ValueError(f"ranks sent incompatible contributions for one use of a parameter (wire kinds {sorted(kinds)}); "
                     "do the ranks run the same model code?")


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


class LockstepStep:
    """The exchange of one global microbatch (``exchanged`` tells whether this rank's header went out)."""

    def __init__(self, sync: RankSync, microbatches: int):
        self.sync, self.microbatches = sync, microbatches
        self.exchanged = False

    def exchange(self, weights: torch.Tensor, b: int, held: list) -> tuple[torch.Tensor, Iterator]:
        """Send this rank's weights and factors, receive every rank's.

        Every rank builds the same blocks over the B = sum_r b_r sequences (ranks in order) and runs the
        same solve on them, so the running gradients stay equal on every rank without an all-reduce.

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
        sync = self.sync
        packer = Packer()
        packer.add(WEIGHTS_PARAM, 0, KIND_WEIGHTS, b, 0, 0, weights)
        for k, (_, param, contribs) in enumerate(held):
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
        with_seqs = [r for r, h in enumerate(headers) if h.sequences > 0]
        return torch.cat(rank_weights) / sync.world_size, _merged(held, pieces, with_seqs)


def _merged(held: list, pieces: dict, with_seqs: list) -> Iterator:
    """(k, the global contributions of held[k]) for every parameter some rank sent pieces for."""
    for k, (name, param, _) in enumerate(held):
        uses = pieces.get(k)
        if not uses:
            continue
        for u, by_rank in uses.items():
            if sorted(by_rank) != with_seqs:
                raise ValueError(f"ranks disagree on the calls of parameter {name!r}: use {u} arrived on ranks "
                                 f"{sorted(by_rank)} of the ranks with sequences {with_seqs}")
        work = work_dtype_for(param.dtype)
        yield k, [merge_pieces([uses[u][r] for r in with_seqs], param.shape, work, param.device) for u in sorted(uses)]
