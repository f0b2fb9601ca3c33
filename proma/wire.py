"""The wire format of ``sync="global"``: one rank's contributions packed into one flat byte buffer, and back.

Index conventions: W ranks, b_r sequences of rank r's microbatch, n tokens per sequence, o x i parameter
(P elements). Why each use travels as token factors or as materialised per-sequence gradients, and never as
a per-sequence copy of the whole model's gradient, is told in :mod:`proma.distributed`; this module holds
the format only (:class:`Packer`, :func:`pack_contribution`, :func:`unpack`, :func:`merge_pieces`). What a
use looks like on the wire is its contribution kind's business (``to_wire`` / ``from_wire`` of
:class:`proma.layers.base.Contribution`), so a new kind needs nothing here.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from .layers.base import WIRE_KINDS
from .layers.kinds import SeqGrads

# -- wire format of contributions ----------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)
# a piece's kind on the wire: the built-in contribution kinds and the weights have fixed codes; a kind added by a
# user (a Contribution subclass with a ``wire_name``) gets a code from its name (the same on every rank)
KIND_FACTORS, KIND_IDS, KIND_DENSE, KIND_WEIGHTS = 0, 1, 2, 3
_FIXED_CODES = {"factors": KIND_FACTORS, "ids": KIND_IDS, "dense": KIND_DENSE, "weights": KIND_WEIGHTS}
_FIRST_FREE_CODE = 16
_FIXED = 7      # param, use, kind, b, n, flag, slots used
_SLOT_LEN = 3   # (dtype, offset, numel) of one tensor
_SLOTS = 3      # tensor slots per piece
META_LEN = _FIXED + _SLOT_LEN * _SLOTS
_INT64_BYTES = 8
_ALIGN = 8


def kind_code(kind) -> int:
    """The wire code of a kind given by its wire name (or already a code)."""
    if isinstance(kind, int):
        return kind
    if kind in _FIXED_CODES:
        return _FIXED_CODES[kind]
    return _FIRST_FREE_CODE + zlib.crc32(kind.encode()) % (2 ** 31)


def kind_class(code: int) -> type:
    """The contribution kind of a wire code (ValueError for an unknown one)."""
    for name, cls in WIRE_KINDS.items():
        if kind_code(name) == code:
            return cls
    raise ValueError(f"a rank sent a contribution of unknown wire kind {code}; do the ranks run the same model "
                     "code (and register the same contribution kinds)?")


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

    def add(self, param: int, use: int, kind, b: int, n: int, flag: int, *slots) -> None:
        """One piece of ``kind`` (a wire name or code); ``slots`` are tensors or ``(dtype, offset, numel)``
        locations from :meth:`put`, at most ``_SLOTS``."""
        if len(slots) > _SLOTS:
            raise ValueError(f"a wire piece holds at most {_SLOTS} tensors; got {len(slots)}")
        row = [param, use, kind_code(kind), b, n, flag, len(slots)]
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


def pack_contribution(packer: Packer, param: int, use: int, c, work_dtype: torch.dtype) -> int:
    """Add one use's contribution in its wire form (:meth:`proma.layers.base.Contribution.to_wire`); returns the
    number of elements sent."""
    return c.to_wire(packer, param, use, work_dtype)


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
    out = []
    for row in meta:
        param, use, kind, b, n, flag, used = row[:_FIXED]
        tensors = []
        for k in range(used):
            code, offset, numel = row[_FIXED + _SLOT_LEN * k: _FIXED + _SLOT_LEN * (k + 1)]
            dtype = DTYPES[code]
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            tensors.append(body[offset:offset + nbytes].view(dtype))
        out.append((param, use, Piece(kind, b, n, flag, tensors)))
    return out


def merge_pieces(pieces: list[Piece], shape: torch.Size, work_dtype: torch.dtype, device):
    """One use's contribution over the B sequences of the global microbatch, ranks in order.

    Pieces of one kind are merged by that kind (:meth:`~proma.layers.base.Contribution.from_wire`: ranks that
    sent factors are concatenated along the sequence dimension, tokens zero-padded to the longest kept sequence
    of any rank); when the ranks sent different kinds (one rank found materialised gradients cheaper), every
    piece is materialised and the use becomes :class:`~proma.layers.SeqGrads`.
    """
    shape = torch.Size(shape)
    pieces = [p for p in pieces if p.b > 0]
    if not pieces:
        raise ValueError("merge_pieces needs at least one rank with sequences")
    kinds = {p.kind for p in pieces}
    if len(kinds) == 1:
        return kind_class(pieces[0].kind).from_wire(pieces, shape, work_dtype, device)
    dense = [kind_class(p.kind).from_wire([p], shape, work_dtype, device).materialize(0, shape[0], work_dtype)
             for p in pieces]
    return SeqGrads(torch.cat([d.to(device=device, dtype=work_dtype) for d in dense]))
