"""What one use of a parameter contributes to its per-sequence gradients, and the three operations on it.

Index conventions: b sequences, n tokens per sequence (all of a module call's non-feature positions,
flattened: T, or T x heads, ...), o rows and i columns of a 2-D parameter, P flattened parameter size.

A layer rule turns one module call (a *use*) into a :class:`Contribution` per parameter it touches:
g_i^use, the gradient of sequence i's log-probability through that call. The per-sequence gradient of a
parameter is the sum over its uses, ``g_i = sum_use g_i^use``. Three contribution kinds cover the built-in
layers:

- :class:`OuterFactors` (linear weight): ``g_i = sum_{t in i} A_t^T B_t`` with A (b, n, o) the output
  gradients D and B (b, n, i) the inputs X.
- :class:`IdsFactors` (embedding weight): ``g_i[v] = sum_{t in i, ids_t = v} B_t``, i.e. A is the one-hot of
  the ids, never formed.
- :class:`SeqGrads` (norm scales, biases): the b per-sequence gradients themselves, (b, *shape); they are
  small (b x P with P a vector length), so they are formed directly.

Each kind knows how to (1) materialise its per-sequence gradients for a range of rows, (2) give the inner
products ``<g_i^use, G>`` and (3) add ``sum_i a_i g_i^use`` into a tensor, without forming the b x o x i
gradients where the factored form is cheaper; :mod:`proma.layers.block` combines uses and picks a route.
"""
from __future__ import annotations

import torch


class Contribution:
    """Base class; ``shape`` is the parameter's shape, ``b`` the number of sequences."""

    shape: torch.Size
    b: int

    def materialize(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-sequence gradients of rows ``r0:r1`` of the parameter, (b, r1 - r0, *shape[1:])."""
        raise NotImplementedError

    def inner(self, G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``<g_i^use, G>`` for every sequence, (b,), without materialising."""
        raise NotImplementedError

    def add_weighted_(self, out: torch.Tensor, a: torch.Tensor) -> None:
        """``out += sum_i a_i g_i^use`` in place (out has the parameter's shape)."""
        raise NotImplementedError

    def materialize_flops(self) -> float:
        """Multiply-adds to materialise all rows."""
        raise NotImplementedError

    def factored_flops(self) -> float:
        """Multiply-adds of one factored inner product or weighted sum."""
        raise NotImplementedError


class SeqGrads(Contribution):
    """Per-sequence gradients given directly: ``g`` (b, *shape)."""

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.b = g.shape[0]
        self.shape = g.shape[1:]

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


class OuterFactors(Contribution):
    """``g_i = sum_{t in i} A_t^T B_t``: A (b, n, o) output gradients, B (b, n, i) inputs; parameter (o, i).

    ``is_linear_weight`` marks the weight of an ``nn.Linear`` call (A = D, B = X), which the intra variant
    projects.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, *, is_linear_weight: bool = False):
        if A.shape[:2] != B.shape[:2]:
            raise ValueError(f"factors must share (b, n); got A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A, self.B = A, B
        self.b, self.n = A.shape[0], A.shape[1]
        self.shape = torch.Size((A.shape[2], B.shape[2]))
        self.is_linear_weight = is_linear_weight

    def materialize(self, r0, r1, dtype):
        # (b, o_chunk, n) @ (b, n, i): the b per-sequence outer-product sums in one batched matmul
        return torch.bmm(self.A[:, :, r0:r1].transpose(1, 2).to(dtype), self.B.to(dtype))

    def inner(self, G, dtype):
        # <D_i^T X_i, G> = sum_t D_t . (G X_t): one (b n, i) x (i, o) product
        Y = self.B.to(dtype) @ G.to(dtype).T
        return (Y * self.A.to(dtype)).sum(dim=(1, 2))

    def add_weighted_(self, out, a):
        A = self.A.to(out.dtype) * a.to(out.dtype)[:, None, None]
        out.addmm_(A.reshape(-1, A.shape[2]).T, self.B.to(out.dtype).reshape(-1, self.B.shape[2]))

    def materialize_flops(self):
        return float(self.b * self.n * self.shape[0] * self.shape[1])

    def factored_flops(self):
        return self.materialize_flops()


class IdsFactors(Contribution):
    """``g_i[v] = sum_{t in i, ids_t = v} B_t``: ids (b, n) into ``rows`` rows, B (b, n, e); parameter (rows, e).

    Tokens that do not contribute (an embedding's ``padding_idx``) must have zero rows in B.
    """

    def __init__(self, ids: torch.Tensor, B: torch.Tensor, rows: int):
        if ids.shape != B.shape[:2]:
            raise ValueError(f"ids {tuple(ids.shape)} must match B {tuple(B.shape)} in (b, n)")
        self.ids, self.B = ids, B
        self.b, self.n = ids.shape
        self.shape = torch.Size((rows, B.shape[2]))

    def materialize(self, r0, r1, dtype):
        b, n, e = self.B.shape
        out = torch.zeros(b * (r1 - r0), e, dtype=dtype, device=self.B.device)
        inside = (self.ids >= r0) & (self.ids < r1)
        seq = torch.arange(b, device=self.ids.device)[:, None].expand(b, n)
        flat = (seq * (r1 - r0) + (self.ids - r0))[inside]
        out.index_add_(0, flat, self.B[inside].to(dtype))
        return out.view(b, r1 - r0, e)

    def inner(self, G, dtype):
        return (G.to(dtype)[self.ids] * self.B.to(dtype)).sum(dim=(1, 2))

    def add_weighted_(self, out, a):
        src = self.B.to(out.dtype) * a.to(out.dtype)[:, None, None]
        out.index_add_(0, self.ids.reshape(-1), src.reshape(-1, src.shape[2]))

    def materialize_flops(self):
        return float(self.B.numel())

    def factored_flops(self):
        return float(self.B.numel())


def token_gram(u: Contribution, v: Contribution, dtype: torch.dtype, *, max_elems: int = 1 << 24) -> torch.Tensor:
    """Cross Gram ``<g_i^u, g_j^v>`` (b, b) of two factored uses through token Grams (the "ghost" route).

    ``sum_{t in i, s in j} (A^u_t . A^v_s)(B^u_t . B^v_s)``, where for ids the row factor is a one-hot:
    ``onehot(k) . onehot(l) = [k == l]`` and ``onehot(k) . A_s = A_s[k]``. Sequences of ``u`` are processed
    in groups so that no token Gram larger than ``max_elems`` exists at once.
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
        if isinstance(u, OuterFactors) and isinstance(v, OuterFactors):
            inner_A = u.A[s0:s1].to(dtype).reshape(-1, u.shape[0]) @ v.A.to(dtype).reshape(-1, v.shape[0]).T
        elif isinstance(u, IdsFactors) and isinstance(v, IdsFactors):
            inner_A = (u.ids[s0:s1].reshape(-1, 1) == v.ids.reshape(1, -1)).to(dtype)
        elif isinstance(u, IdsFactors):
            inner_A = v.A.to(dtype).reshape(-1, v.shape[0])[:, u.ids[s0:s1].reshape(-1)].T
        else:
            inner_A = u.A[s0:s1].to(dtype).reshape(-1, u.shape[0])[:, v.ids.reshape(-1)]
        prod = (inner_A * inner_B).view(s1 - s0, u.n, b, nv)
        out[s0:s1] = prod.sum(dim=(1, 3))
    return out


def token_gram_flops(u: Contribution, v: Contribution) -> float:
    """Multiply-adds of :func:`token_gram`."""
    pairs = float(u.b * u.n) * float(v.b * v.n)
    row = u.shape[0] if isinstance(u, OuterFactors) and isinstance(v, OuterFactors) else 1
    return pairs * (row + u.shape[1])
