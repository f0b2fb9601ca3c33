"""The wire format of ``sync="global"``: one rank's contributions packed into one flat byte buffer, and back.

Index conventions: W ranks, b_r sequences of rank r's microbatch, n tokens per sequence, o x i parameter
(P elements). Why each use travels as token factors or as materialised per-sequence gradients, and never as
a per-sequence copy of the whole model's gradient, is told in :mod:`proma.distributed`; this module holds
the format only (:class:`Packer`, :func:`pack_contribution`, :func:`unpack`, :func:`merge_pieces`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import IdsFactors, OuterFactors, SeqGrads

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
        """``[meta (int64, pieces x META_LEN)] [pieces]`` as one uint8 tensor on ``device``.

        The packer lets go of its pieces (copies of token rows among them), so that only the buffer stays alive
        during the exchange.
        """
        meta = torch.tensor(self.meta, dtype=torch.int64).reshape(-1)
        head = meta.view(torch.uint8).to(device)
        buf = torch.cat([head] + [p.to(device) for p in self.parts])
        self.parts = []
        return buf


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
