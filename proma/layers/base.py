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

Built-in kinds (:mod:`proma.layers.kinds`; the token-row helpers they share with new kinds in
:mod:`proma.layers.tokens`):

- :class:`OuterFactors` (linear weight): ``g_i = sum_{t in i} A_t^T B_t`` with A (b, n, o) the output
  gradients D and B (b, n, i) the inputs X.
- :class:`IdsFactors` (embedding weight): ``g_i[v] = sum_{t in i, ids_t = v} B_t``, i.e. A is the one-hot of
  the ids, never formed.
- :class:`SeqGrads` (norm scales, biases): the b per-sequence gradients themselves, (b, *shape); they are
  small (b x P with P a vector length), so they are formed directly.
"""
from __future__ import annotations

import torch

# wire name -> kind, for every subclass that declares ``wire_name`` (filled by Contribution.__init_subclass__)
WIRE_KINDS: dict[str, type] = {}
# the kind every contribution can be sent as: its materialised per-sequence gradients (kinds.SeqGrads)
DENSE_WIRE_NAME = "dense"


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

        Default: the materialised per-sequence gradients, as a piece of the dense kind (``SeqGrads``)."""
        dense = WIRE_KINDS[DENSE_WIRE_NAME](self.materialize(0, self.shape[0], work_dtype))
        return dense.to_wire(packer, param, use, work_dtype)

    @classmethod
    def from_wire(cls, pieces: list, shape: torch.Size, work_dtype: torch.dtype, device) -> "Contribution":
        """One use over the sequences of every rank's piece (ranks in order), from pieces of this kind."""
        raise NotImplementedError(f"{cls.__name__} defines no wire form")


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
