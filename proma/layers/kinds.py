"""The built-in contribution kinds: per-sequence gradients, outer (linear) factors and embedding ids.

Index conventions and the interface they implement: :mod:`proma.layers.base` (:class:`Contribution`).
"""
from __future__ import annotations

import torch

from .base import DENSE_WIRE_NAME, Contribution
from .tokens import _tokens, active_positions, token_keep

# vocabularies up to this size send their ids as int32
INT32_IDS_LIMIT = 2 ** 31

class SeqGrads(Contribution):
    """Per-sequence gradients given directly: ``g`` (b, *shape)."""

    wire_name = DENSE_WIRE_NAME

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.b = g.shape[0]
        self.shape = g.shape[1:]

    @property
    def device(self):
        return self.g.device

    def materialize(self, r0, r1, dtype):
        return self.g[:, r0:r1].to(dtype)

    def inner(self, G, dtype):
        return self.g.reshape(self.b, -1).to(dtype) @ G.reshape(-1).to(dtype)

    def add_weighted_(self, out, a):
        out.add_((a.to(out.dtype) @ self.g.reshape(self.b, -1).to(out.dtype)).view(out.shape))

    def materialize_flops(self):
        return float(self.g.numel())

    def factored_flops(self):
        return float(self.g.numel())

    def to_wire(self, packer, param, use, work_dtype):
        packer.add(param, use, self.wire_name, self.b, 0, 0, self.g)
        return self.g.numel()

    @classmethod
    def from_wire(cls, pieces, shape, work_dtype, device):
        return cls(torch.cat([p.tensors[0].reshape(p.b, *shape).to(device=device, dtype=work_dtype) for p in pieces]))


class _TokenFactored(Contribution):
    """Kinds of the form ``g_i = sum_{t in i} a_t^T B_t`` with B (b, n, i) token rows: their cross Grams go
    through token Grams ``(a_t . a'_s)(B_t . B'_s)`` (the "ghost" route), a pair at a time.

    A subclass gives :meth:`pairs_with` (the kinds it knows), :meth:`row_inner`, the (tokens of sequences s0:s1
    of self, all tokens of other) matrix of ``a_t . a'_s`` for those kinds, and ``row_width``, the length of
    a_t used in the cost (1 for a one-hot).
    """

    B: torch.Tensor
    n: int
    row_width: int

    @property
    def device(self):
        return self.B.device

    def pairs_with(self, other: Contribution) -> bool:
        """Whether :meth:`row_inner` knows ``other``'s kind."""
        return False

    def row_inner(self, other: "_TokenFactored", s0: int, s1: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def cross_gram(self, other, dtype, max_elems):
        if not self.pairs_with(other):
            return NotImplemented
        return token_gram(self, other, dtype, max_elems=max_elems)

    def cross_gram_flops(self, other):
        if not self.pairs_with(other):
            return NotImplemented
        pairs = float(self.b * self.n) * float(other.b * other.n)
        row = self.row_width if self.row_width > 1 and other.row_width > 1 else 1
        return pairs * (row + self.shape[1])


class OuterFactors(_TokenFactored):
    """``g_i = sum_{t in i} A_t^T B_t``: A (b, n, o) output gradients, B (b, n, i) inputs; parameter (o, i).

    ``is_linear_weight`` marks the weight of an ``nn.Linear`` call (A = D, B = X), which the intra variant
    projects.
    """

    wire_name = "factors"
    materializes_new = True

    def __init__(self, A: torch.Tensor, B: torch.Tensor, *, is_linear_weight: bool = False):
        if A.shape[:2] != B.shape[:2]:
            raise ValueError(f"factors must share (b, n); got A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A, self.B = A, B
        self.b, self.n = A.shape[0], A.shape[1]
        self.shape = torch.Size((A.shape[2], B.shape[2]))
        self.row_width = A.shape[2]
        self.is_linear_weight = is_linear_weight
        self._active = None

    def active(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) on the positions that contribute (:func:`active_positions`), found once: the factors the
        sums over tokens run on. The cost model, the token Grams and the wire form see every position."""
        if self._active is None:
            self._active = active_positions(self.A, self.B)
        return self._active

    def materialize(self, r0, r1, dtype):
        # (b, o_chunk, n) @ (b, n, i): the b per-sequence outer-product sums in one batched matmul
        A, B = self.active()
        return torch.bmm(A[:, :, r0:r1].transpose(1, 2).to(dtype), B.to(dtype))

    def inner(self, G, dtype):
        # <D_i^T X_i, G> = sum_t D_t . (G X_t): one (b n, i) x (i, o) product
        A, B = self.active()
        Y = B.to(dtype) @ G.to(dtype).T
        return (Y * A.to(dtype)).sum(dim=(1, 2))

    def add_weighted_(self, out, a):
        A, B = self.active()
        A = A.to(out.dtype) * a.to(out.dtype)[:, None, None]
        out.addmm_(A.reshape(-1, A.shape[2]).T, B.to(out.dtype).reshape(-1, B.shape[2]))

    def materialize_flops(self):
        return float(self.b * self.n * self.shape[0] * self.shape[1])

    def factored_flops(self):
        return self.materialize_flops()

    def pairs_with(self, other):
        return isinstance(other, (OuterFactors, IdsFactors))

    def row_inner(self, other, s0, s1, dtype):
        if isinstance(other, OuterFactors):
            return self.A[s0:s1].to(dtype).reshape(-1, self.shape[0]) @ other.A.to(dtype).reshape(-1, other.shape[0]).T
        # IdsFactors: onehot(l) . A_t = A_t[l]
        return self.A[s0:s1].to(dtype).reshape(-1, self.shape[0])[:, other.ids.reshape(-1)]

    def linear_factors(self):
        if not self.is_linear_weight:
            return None
        return self.B.reshape(-1, self.B.shape[-1]), self.A.reshape(-1, self.A.shape[-1])

    def to_wire(self, packer, param, use, work_dtype):
        keep, counts = token_keep(self.A)
        t = int(counts.sum())
        n = int(counts.max()) if self.b else 0
        o, i = self.shape
        if t * (o + i) > self.b * o * i:  # the materialised gradients are smaller than the kept token rows
            return super().to_wire(packer, param, use, work_dtype)
        # X is shared by several projections (q, k, v; gate, up): store it once per token selection
        loc = packer.put(self.B[keep], key=("X", self.B.data_ptr(), tuple(self.B.shape), self.B.stride(),
                                            keep.cpu().numpy().tobytes()))
        packer.add(param, use, self.wire_name, self.b, n, int(self.is_linear_weight), counts.to(torch.int32),
                   self.A[keep], loc)
        return self.b + t * (o + i)

    @classmethod
    def from_wire(cls, pieces, shape, work_dtype, device):
        n = max(p.n for p in pieces)
        A = torch.cat([_tokens(p, 1, (shape[0],), n, device) for p in pieces])
        B = torch.cat([_tokens(p, 2, (shape[1],), n, device) for p in pieces])
        return cls(A, B, is_linear_weight=bool(pieces[0].flag))


class IdsFactors(_TokenFactored):
    """``g_i[v] = sum_{t in i, ids_t = v} B_t``: ids (b, n) into ``rows`` rows, B (b, n, e); parameter (rows, e).

    Tokens that do not contribute (an embedding's ``padding_idx``) must have zero rows in B.
    """

    wire_name = "ids"
    row_width = 1
    materializes_new = True

    def __init__(self, ids: torch.Tensor, B: torch.Tensor, rows: int):
        if ids.shape != B.shape[:2]:
            raise ValueError(f"ids {tuple(ids.shape)} must match B {tuple(B.shape)} in (b, n)")
        self.ids, self.B = ids, B
        self.b, self.n = ids.shape
        self.shape = torch.Size((rows, B.shape[2]))

    def materialize(self, r0, r1, dtype):
        b, e = self.b, self.shape[1]
        out = torch.zeros(b, r1 - r0, e, dtype=dtype, device=self.B.device)
        self.add_materialized_(out, r0, r1)
        return out

    def add_materialized_(self, out, r0, r1):
        # scatter-add each token's row into its sequence's row ids_t (no (b, rows, e) intermediate)
        if not out.is_contiguous():
            return super().add_materialized_(out, r0, r1)
        b, n = self.ids.shape
        inside = (self.ids >= r0) & (self.ids < r1)
        seq = torch.arange(b, device=self.ids.device)[:, None].expand(b, n)
        flat = (seq * (r1 - r0) + (self.ids - r0))[inside]
        out.view(b * (r1 - r0), self.shape[1]).index_add_(0, flat, self.B[inside].to(out.dtype))

    def inner(self, G, dtype):
        return (G.to(dtype)[self.ids] * self.B.to(dtype)).sum(dim=(1, 2))

    def add_weighted_(self, out, a):
        src = self.B.to(out.dtype) * a.to(out.dtype)[:, None, None]
        out.index_add_(0, self.ids.reshape(-1), src.reshape(-1, src.shape[2]))

    def materialize_flops(self):
        return float(self.B.numel())

    def factored_flops(self):
        return float(self.B.numel())

    def sparse_rows(self):
        return self.ids.reshape(-1)

    def materialize_rows(self, rows, dtype):
        u, e = rows.numel(), self.shape[1]
        g = torch.zeros(self.b * u, e, dtype=dtype, device=self.B.device)
        pos = torch.searchsorted(rows, self.ids)
        seq = torch.arange(self.b, device=self.ids.device)[:, None].expand_as(self.ids)
        g.index_add_(0, (seq * u + pos).reshape(-1), self.B.reshape(-1, e).to(dtype))
        return g.view(self.b, u, e)

    def pairs_with(self, other):
        return isinstance(other, (OuterFactors, IdsFactors))

    def row_inner(self, other, s0, s1, dtype):
        if isinstance(other, IdsFactors):  # onehot(k) . onehot(l) = [k == l]
            return (self.ids[s0:s1].reshape(-1, 1) == other.ids.reshape(1, -1)).to(dtype)
        # OuterFactors: onehot(k) . A_s = A_s[k]
        return other.A.to(dtype).reshape(-1, other.shape[0])[:, self.ids[s0:s1].reshape(-1)].T

    def to_wire(self, packer, param, use, work_dtype):
        keep, counts = token_keep(self.B)
        t = int(counts.sum())
        n = int(counts.max()) if self.b else 0
        ids = self.ids if self.shape[0] >= INT32_IDS_LIMIT else self.ids.to(torch.int32)
        packer.add(param, use, self.wire_name, self.b, n, 0, counts.to(torch.int32), ids[keep], self.B[keep])
        return self.b + t * (1 + self.shape[1])

    @classmethod
    def from_wire(cls, pieces, shape, work_dtype, device):
        n = max(p.n for p in pieces)
        ids = torch.cat([_tokens(p, 1, (), n, device).to(torch.int64) for p in pieces])
        B = torch.cat([_tokens(p, 2, (shape[1],), n, device) for p in pieces])
        return cls(ids, B, shape[0])


def token_gram(u: _TokenFactored, v: _TokenFactored, dtype: torch.dtype, *, max_elems: int = 1 << 24) -> torch.Tensor:
    """Cross Gram ``<g_i^u, g_j^v>`` (b, b) of two token-factored uses through token Grams (the "ghost" route).

    ``sum_{t in i, s in j} (a^u_t . a^v_s)(B^u_t . B^v_s)``, the row factors' products from
    :meth:`_TokenFactored.row_inner` (for ids a one-hot: ``onehot(k) . onehot(l) = [k == l]`` and
    ``onehot(k) . A_s = A_s[k]``). Sequences of ``u`` are processed in groups so that no token Gram larger
    than ``max_elems`` exists at once.
    """
    b = u.b
    Bv = v.B.to(dtype).reshape(-1, v.B.shape[2])
    out = torch.zeros(b, b, dtype=dtype, device=Bv.device)
    nv = v.n
    group = max(1, max_elems // max(1, u.n * b * nv))
    for s0 in range(0, b, group):
        s1 = min(b, s0 + group)
        Bu = u.B[s0:s1].to(dtype).reshape(-1, u.B.shape[2])
        inner_B = Bu @ Bv.T  # (tokens of u in group, all tokens of v)
        inner_A = u.row_inner(v, s0, s1, dtype)
        prod = (inner_A * inner_B).view(s1 - s0, u.n, b, nv)
        out[s0:s1] = prod.sum(dim=(1, 3))
    return out
