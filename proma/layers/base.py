"""What one use of a parameter contributes to its per-sequence gradients: the open interface of contribution kinds.

Index conventions: b sequences, n tokens per sequence (all of a module call's non-feature positions,
flattened: T, or T x heads, ...), o rows and i columns of a 2-D parameter, P flattened parameter size.

A layer rule turns one module call (a *use*) into a :class:`Contribution` per parameter it touches:
g_i^use, the gradient of sequence i's log-probability through that call. The per-sequence gradient of a
parameter is the sum over its uses, ``g_i = sum_use g_i^use``. A contribution *kind* is one subclass of
:class:`Contribution`; everything else (:class:`proma.layers.Block`, the wire format of ``sync="global"``,
the intra variant) talks to it through the methods below only, so a new kind is one class (docs/extending.md).

Required (the three operations and their costs):

- :meth:`~Contribution.materialize` the per-sequence gradients of a range of rows, (b, r1 - r0, *shape[1:]);
- :meth:`~Contribution.inner`       the inner products ``<g_i^use, G>``, (b,);
- :meth:`~Contribution.add_weighted_` ``out += sum_i a_i g_i^use`` (the weighted update);
- :meth:`~Contribution.materialize_flops`, :meth:`~Contribution.factored_flops` for the cost model.

Optional, each with a default that is always correct:

- :meth:`~Contribution.cross_gram` / :meth:`~Contribution.cross_gram_flops`: the b x b cross Gram with
  another use without materialising (the "ghost" route); default ``NotImplemented`` (the block then
  materialises). Double dispatch: a block asks ``u.cross_gram(v)``, then ``v.cross_gram(u)`` transposed.
- :meth:`~Contribution.add_materialized_` (``out += materialize(r0, r1)``, default exactly that) and
  ``materializes_new`` (materialize never returns a view of the contribution's own data; default False): a
  block of several uses adds the others into such a use's new tensor instead of cloning it;
- :meth:`~Contribution.sparse_rows` / :meth:`~Contribution.materialize_rows`: the rows a use touches (an
  embedding's ids), so that a block of such uses materialises only those; default ``None`` (all rows).
- :meth:`~Contribution.linear_factors`: the (X, D) token rows of an ``nn.Linear`` weight use, which the intra
  variant projects; default ``None`` (the parameter then gets plain accumulation under intra).
- :meth:`~Contribution.to_wire` / :meth:`~Contribution.from_wire`: the wire form of ``sync="global"``;
  default: the materialised per-sequence gradients, sent as :class:`SeqGrads`.

Built-in kinds:

- :class:`OuterFactors` (linear weight): ``g_i = sum_{t in i} A_t^T B_t`` with A (b, n, o) the output
  gradients D and B (b, n, i) the inputs X.
- :class:`IdsFactors` (embedding weight): ``g_i[v] = sum_{t in i, ids_t = v} B_t``, i.e. A is the one-hot of
  the ids, never formed.
- :class:`SeqGrads` (norm scales, biases): the b per-sequence gradients themselves, (b, *shape); they are
  small (b x P with P a vector length), so they are formed directly.
"""
from __future__ import annotations

import torch

# vocabularies up to this size send their ids as int32
INT32_IDS_LIMIT = 2 ** 31
# devices on which an outer-factor use drops its silent token positions before its products (a host read)
TRIM_DEVICES = ("cpu",)
# ... when at least this fraction of its positions is silent (below it the copies cost about what they save),
# judged first on every TRIM_SAMPLE_STRIDE-th position
TRIM_MIN_SILENT = 0.25
TRIM_SAMPLE_STRIDE = 8
# wire name -> kind, for every subclass that declares ``wire_name`` (filled by Contribution.__init_subclass__)
WIRE_KINDS: dict[str, type] = {}


class Contribution:
    """One use's contribution to a parameter's per-sequence gradients; subclass it for a new kind.

    Attributes
    ----------
    shape : torch.Size, the parameter's shape.  b : int, the number of sequences.
    wire_name : str (class attribute), the kind's name on the wire of ``sync="global"``; a subclass that
        defines it and :meth:`from_wire` travels in its own form, others as materialised gradients.
    """

    shape: torch.Size
    b: int
    wire_name: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("wire_name")
        if name is not None:
            if name in WIRE_KINDS and WIRE_KINDS[name] is not cls:
                raise ValueError(f"contribution kind {cls.__name__}: wire_name {name!r} is taken by "
                                 f"{WIRE_KINDS[name].__name__}")
            WIRE_KINDS[name] = cls

    # -- required ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the contribution's tensors."""
        raise NotImplementedError

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

    # -- optional, with correct defaults -------------------------------------------------------------
    # True when :meth:`materialize` always returns a new tensor (never a view of the contribution's own data),
    # which a block may then accumulate the other uses into
    materializes_new: bool = False

    def add_materialized_(self, out: torch.Tensor, r0: int, r1: int) -> None:
        """``out += materialize(r0, r1)`` in place; ``out`` (b, r1 - r0, *shape[1:]) is in the work dtype."""
        out.add_(self.materialize(r0, r1, out.dtype))

    def cross_gram(self, other: "Contribution", dtype: torch.dtype, max_elems: int):
        """``<g_i^self, g_j^other>`` (b, b) without materialising, or ``NotImplemented`` for this pair."""
        return NotImplemented

    def cross_gram_flops(self, other: "Contribution"):
        """Multiply-adds of :meth:`cross_gram` with ``other``, or ``NotImplemented``."""
        return NotImplemented

    def sparse_rows(self) -> torch.Tensor | None:
        """The parameter rows this use can touch (1-D int64, any order, repeats allowed), or None for all."""
        return None

    def materialize_rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-sequence gradients on ``rows`` (sorted, unique, a superset of :meth:`sparse_rows`), (b, len(rows), ...).

        Only called when :meth:`sparse_rows` is not None."""
        raise NotImplementedError

    def linear_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token rows (X (t, i), D (t, o)) of an ``nn.Linear`` weight use (the intra variant), or None."""
        return None

    def to_wire(self, packer, param: int, use: int, work_dtype: torch.dtype) -> int:
        """Add this use to ``packer`` (:class:`proma.wire.Packer`) in its wire form; returns elements sent.

        Default: the materialised per-sequence gradients, as a :class:`SeqGrads` piece."""
        return SeqGrads(self.materialize(0, self.shape[0], work_dtype)).to_wire(packer, param, use, work_dtype)

    @classmethod
    def from_wire(cls, pieces: list, shape: torch.Size, work_dtype: torch.dtype, device) -> "Contribution":
        """One use over the sequences of every rank's piece (ranks in order), from pieces of this kind."""
        raise NotImplementedError(f"{cls.__name__} defines no wire form")


# -- token rows: the helpers of kinds that travel as token factors --------------------------------------------

def token_keep(rows_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose row of ``rows_factor`` (b, n, d) is non-zero, (b, n) bool, and their count per sequence (b,).

    Tokens with a zero output gradient (padding, and positions the loss does not reach) contribute nothing to
    g_i, K or h, so only the others travel; the receiver packs each sequence's tokens to the front (token
    order within a sequence does not matter for sums over tokens).
    """
    keep = (rows_factor != 0).any(dim=-1)
    return keep, keep.sum(dim=1)


def active_positions(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (b, n, o) and ``B`` (b, n, i) without the token positions that contribute nothing to any sequence.

    A position is silent when its row of ``A`` is exactly zero in every sequence and its rows of ``B`` are
    finite (so a NaN or inf that would reach ``A_t^T B_t`` as ``0 * inf`` is kept, and the microbatch's
    finiteness checks see it). Sums over tokens (``sum_t A_t^T B_t``, ``sum_t A_t . (G B_t)``) are the same
    without the silent positions up to rounding, at the cost of the others only: a language model's head gets
    a zero output gradient at every position whose log-probability the loss does not score (a prompt), and so
    does the token-wise part of the last decoder layer.

    Dropping positions copies the factors, which pays only when many are silent: every
    :data:`TRIM_SAMPLE_STRIDE`-th position is tested first (a pass over that fraction of ``A``), and the
    silent ones are looked for and dropped only when at least :data:`TRIM_MIN_SILENT` of the sample is.

    CPU only (:data:`TRIM_DEVICES`): the positions kept are a data-dependent shape (``nonzero``), which on
    an accelerator would make the host wait for the device; there, and when too few positions are silent,
    the factors are returned as they are (no copy).
    """
    n = A.shape[1]
    if A.device.type not in TRIM_DEVICES or n < TRIM_SAMPLE_STRIDE:
        return A, B

    def silent(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # (positions,) bool: A exactly zero in every sequence (a NaN is not), and B finite there
        return (a.abs().amax(dim=(0, 2)) == 0) & torch.isfinite(x.sum(dim=(0, 2)))

    sample = silent(A[:, ::TRIM_SAMPLE_STRIDE], B[:, ::TRIM_SAMPLE_STRIDE])
    if sample.nonzero().shape[0] < TRIM_MIN_SILENT * sample.shape[0]:
        return A, B
    idx = (~silent(A, B)).nonzero().squeeze(1)
    if idx.shape[0] > (1.0 - TRIM_MIN_SILENT) * n:
        return A, B
    return A.index_select(1, idx), B.index_select(1, idx)


def unpack_tokens(counts: torch.Tensor, rows: torch.Tensor, n: int, device) -> torch.Tensor:
    """Kept token rows (t, d) of b sequences with ``counts`` -> (b, n, d), each sequence's rows at the front."""
    counts = counts.to(device=device, dtype=torch.int64)
    b = counts.numel()
    out = torch.zeros((b, n) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    seq = torch.repeat_interleave(torch.arange(b, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(seq.numel(), device=device) - starts[seq]
    out[seq, pos] = rows.to(device)
    return out


def _tokens(piece, k: int, width: tuple, n: int, device) -> torch.Tensor:
    return unpack_tokens(piece.tensors[0], piece.tensors[k].reshape(-1, *width), n, device)


# -- the built-in kinds ---------------------------------------------------------------------------------------

class SeqGrads(Contribution):
    """Per-sequence gradients given directly: ``g`` (b, *shape)."""

    wire_name = "dense"

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


def pair_gram(u: Contribution, v: Contribution, dtype: torch.dtype, max_elems: int):
    """``<g_i^u, g_j^v>`` (b, b) by double dispatch (``u.cross_gram(v)``, else ``v.cross_gram(u)^T``), or
    ``NotImplemented`` when neither kind knows the pair."""
    K = u.cross_gram(v, dtype, max_elems)
    if K is NotImplemented:
        K = v.cross_gram(u, dtype, max_elems)
        K = K if K is NotImplemented else K.T
    return K


def pair_gram_flops(u: Contribution, v: Contribution):
    """Multiply-adds of :func:`pair_gram`, or ``NotImplemented``."""
    f = u.cross_gram_flops(v)
    return v.cross_gram_flops(u) if f is NotImplemented else f


def token_gram_flops(u: Contribution, v: Contribution) -> float:
    """Multiply-adds of :func:`token_gram` (inf where the pair has no factored route)."""
    f = pair_gram_flops(u, v)
    return float("inf") if f is NotImplemented else float(f)
