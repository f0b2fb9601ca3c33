"""One parameter tensor (a block): its uses combined, and the three operations PROMA needs.

Index conventions: b sequences, n tokens per sequence, o x i parameter (P = o * i elements).

``g_i = sum_use g_i^use``. A :class:`Block` offers

- :meth:`Block.gram`           the b x b Gram ``K_ij = <g_i, g_j>``,
- :meth:`Block.inner`          the b inner products ``h_i = <g_i, G>`` with the running gradient G,
- :meth:`Block.add_weighted_`  ``out += sum_i a_i g_i`` (with a = w this is the microbatch gradient pg; with
                               a = w - shrinkage * c it applies ``G <- G - shrinkage R + pg`` in one pass),

as separate steps so that a caller can reduce K and h across processes between them. Two strategies:

``"materialize"``  form the b per-sequence gradients of this one parameter, (b, P), by rows in chunks of
                   at most ``max_transient`` elements. K = g g^T (b^2 P), h = g G (b P); with one chunk the
                   update is ``a^T g`` (b P), otherwise it goes through the factors (as plain backprop does).
``"ghost"``        never form them: K from token Grams ``sum_{t in i, s in j} (A_t.A_s)(B_t.B_s)``
                   ((b n)^2 (o + i)), h and the update through the factors (b n o i each).

``"auto"`` compares the multiply-adds of the two routes (including the chunking penalty and a memory-traffic
charge of ``MEMORY_WEIGHT`` per materialised element) and takes the cheaper; for blocks some pair of whose
uses has no factored cross Gram (vector contributions: norms, biases) and for blocks whose uses all name
the rows they touch (embeddings: the per-sequence gradients are formed on those rows only) it materialises.
The block talks to its contributions through :class:`proma.layers.base.Contribution`'s methods only, so a new
contribution kind needs nothing here.
"""
from __future__ import annotations

import math

import torch

from .base import Contribution, pair_gram, pair_gram_flops

STRATEGIES = ("auto", "materialize", "ghost")
# The Gram is accumulated in float64 whatever the model dtype (and so are the inner products on the materialize
# route): its rounding then stays far below that of the per-sequence gradients themselves, which sets the
# resolvable rank. Where each quantity lives is stated once, in proma.accumulator's docstring ("Precision").
GRAM_DTYPE = torch.float64
# Columns of a per-sequence gradient chunk converted to float64 at a time: bounds the transient float64
# copy to b * GRAM_COLUMNS elements instead of a second, twice as large, copy of the chunk.
GRAM_COLUMNS = 1 << 15


def _gram_update_(K: torch.Tensor, h: torch.Tensor | None, g: torch.Tensor, Gf: torch.Tensor | None) -> None:
    """``K += g g^T`` and ``h += g Gf`` in float64, for g (b, n) in the work dtype, in column slices."""
    for c0 in range(0, g.shape[1], GRAM_COLUMNS):
        gd = g[:, c0:c0 + GRAM_COLUMNS].to(GRAM_DTYPE)
        K.addmm_(gd, gd.T)
        if h is not None:
            h.addmv_(gd, Gf[c0:c0 + GRAM_COLUMNS].to(GRAM_DTYPE))   # a view when Gf is float64 already
DEFAULT_MAX_TRANSIENT = 1 << 24  # elements of a transient per-sequence gradient chunk (64 MiB in float32)
# Multiply-add equivalents charged per element of materialised per-sequence gradients: the (b, P) tensor is
# written once and read by the Gram, the inner products and the update, which is memory-bound; calibrated
# on CPU with Qwen3-0.6B layer shapes (benchmarks/bench_accumulator.py), where it makes "auto" pick the
# route that was measured faster (ghost, which needs far less memory, for 1024 x 3072 and larger).
MEMORY_WEIGHT = 96.0


def work_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Dtype the per-layer algebra runs in: the parameter's own, float32 for 16-bit parameters."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Block:
    """The uses of one parameter in a microbatch, with the chosen strategy.

    Parameters
    ----------
    contribs : list of Contribution, all with the same ``b`` and the parameter's ``shape``.
    strategy : {"auto", "materialize", "ghost"}
    work_dtype : dtype of the per-layer algebra (Grams, inner products, updates).
    max_transient : int, largest number of elements of a materialised chunk.
    """

    def __init__(self, contribs: list[Contribution], *, strategy: str = "auto", work_dtype: torch.dtype,
                 max_transient: int = DEFAULT_MAX_TRANSIENT):
        if not contribs:
            raise ValueError("a block needs at least one contribution")
        self.contribs = contribs
        self.b = contribs[0].b
        self.shape = torch.Size(contribs[0].shape)
        for c in contribs:
            if c.b != self.b or torch.Size(c.shape) != self.shape:
                raise ValueError(f"uses of one parameter disagree: (b={c.b}, {tuple(c.shape)}) vs "
                                 f"(b={self.b}, {tuple(self.shape)})")
        self.P = math.prod(self.shape)
        self.dtype = work_dtype
        self.max_transient = max(1, int(max_transient))
        self._pair_flops = self._pairs_flops()
        self.factored = self._pair_flops is not None
        self.ids_only = all(c.sparse_rows() is not None for c in contribs)  # only rows the uses name are non-zero
        self.strategy = self._choose(strategy)
        self._g = None      # (b, P) per-sequence gradients when materialised in one chunk
        self._rows = None   # compact rows of an embedding-only block
        self._K = None
        self._h = None

    # -- cost model ----------------------------------------------------------------------------------
    def _pairs_flops(self) -> float | None:
        """Multiply-adds of every pair's factored cross Gram, or None when some pair has none."""
        total, k = 0.0, len(self.contribs)
        for u in range(k):
            for v in range(u, k):
                f = pair_gram_flops(self.contribs[u], self.contribs[v])
                if f is NotImplemented:
                    return None
                total += float(f)
        return total

    def _row_size(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    def _chunk_rows(self) -> int:
        return max(1, self.max_transient // max(1, self.b * self._row_size()))

    def costs(self) -> dict[str, float]:
        """Multiply-adds of one Gram + inner product + update by each route (ghost: inf if not possible)."""
        b, P = self.b, self.P
        single = self._chunk_rows() >= self.shape[0]
        factored = sum(c.factored_flops() for c in self.contribs)
        mat = sum(c.materialize_flops() for c in self.contribs) + b * b * P + b * P + MEMORY_WEIGHT * b * P
        mat += b * P if single else factored
        ghost = math.inf
        if self.factored:
            ghost = self._pair_flops + 2 * factored
        return {"materialize": mat, "ghost": ghost}

    def _choose(self, strategy: str) -> str:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
        if not self.factored:
            return "materialize"  # no factored route (vector contributions: per-sequence gradients are b x P, tiny)
        if self.ids_only and strategy == "auto":
            return "materialize"
        if strategy != "auto":
            return strategy
        cost = self.costs()
        return "ghost" if cost["ghost"] < cost["materialize"] else "materialize"

    # -- materialisation -----------------------------------------------------------------------------
    def _materialize_chunks(self):
        """Yield (r0, r1, g_chunk (b, (r1-r0) * row_size)) over the parameter's rows."""
        rows = self.shape[0]
        step = self._chunk_rows()
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            # the other uses are added into a use's new tensor; a view of a contribution's own data is cloned
            first = next((c for c in self.contribs if c.materializes_new), self.contribs[0])
            g = first.materialize(r0, r1, self.dtype)
            if len(self.contribs) > 1:
                g = g if first.materializes_new else g.clone()
                for c in self.contribs:
                    if c is not first:
                        c.add_materialized_(g, r0, r1)
            yield r0, r1, g.reshape(self.b, -1)

    def _materialize_compact(self) -> torch.Tensor:
        """Uses that name their rows (embeddings): per-sequence gradients on those rows only, (b, rows_u * row)."""
        self._rows = torch.unique(torch.cat([c.sparse_rows().reshape(-1) for c in self.contribs]))
        g = None
        for c in self.contribs:
            part = c.materialize_rows(self._rows, self.dtype)
            g = part if g is None else g + part
        return g.reshape(self.b, -1)

    # -- the three operations ------------------------------------------------------------------------
    def gram_and_inner(self, G: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K (b, b) and, when G is given, h (b,), both float64, sharing one materialisation pass.

        The per-sequence gradients stay in the work dtype; only their products are formed in float64,
        so a float32 model's Gram resolves directions down to ~eps32 (not sqrt(eps32)) of the largest
        singular value (see :func:`proma.solvers.eigen_cutoff`).
        """
        Gw = None if G is None else G.to(self.dtype)
        if self.strategy == "ghost":
            return self.gram(), (None if Gw is None else self.inner(Gw))
        if self.ids_only:
            g = self._materialize_compact()
            K = torch.zeros(self.b, self.b, dtype=GRAM_DTYPE, device=g.device)
            h = None if Gw is None else torch.zeros(self.b, dtype=GRAM_DTYPE, device=g.device)
            _gram_update_(K, h, g, None if Gw is None else Gw[self._rows].reshape(-1))
            self._K, self._h = K, h
            return K, h
        K = torch.zeros(self.b, self.b, dtype=GRAM_DTYPE, device=self._device())
        h = None if Gw is None else torch.zeros(self.b, dtype=GRAM_DTYPE, device=K.device)
        Gf = None if Gw is None else Gw.reshape(self.shape[0], -1)
        single = self._chunk_rows() >= self.shape[0]
        for r0, r1, g in self._materialize_chunks():
            # the chunk's rows of G in float64 once (not once per column slice)
            _gram_update_(K, h, g, None if Gf is None else Gf[r0:r1].reshape(-1).to(GRAM_DTYPE))
            if single:
                self._g = g
        self._K, self._h = K, h
        return K, h

    def gram(self) -> torch.Tensor:
        """The b x b Gram ``K_ij = <g_i, g_j>`` in float64 (token Grams of work-dtype factors, formed in float64)."""
        if self._K is not None:
            return self._K
        if self.strategy == "ghost":
            k = len(self.contribs)
            K = None
            for u in range(k):
                for v in range(u, k):
                    part = pair_gram(self.contribs[u], self.contribs[v], GRAM_DTYPE, self.max_transient)
                    part = part if u == v else part + part.T
                    K = part if K is None else K + part
            self._K = K
            return K
        return self.gram_and_inner(None)[0]

    def inner(self, G: torch.Tensor) -> torch.Tensor:
        """``h_i = <g_i, G>`` (b,) in the work dtype."""
        Gw = G.to(self.dtype)
        if self._g is not None:
            return self._g @ Gw.reshape(-1)
        if self._rows is not None:
            g = self._materialize_compact()
            return g @ Gw[self._rows].reshape(-1)
        h = None
        for c in self.contribs:
            part = c.inner(Gw, self.dtype)
            h = part if h is None else h + part
        return h

    def add_weighted_(self, out: torch.Tensor, a: torch.Tensor) -> None:
        """``out += sum_i a_i g_i`` in place; ``out`` has the parameter's shape and the work dtype."""
        a = a.to(device=out.device, dtype=out.dtype)
        if self._g is not None:
            out.view(-1).addmv_(self._g.T, a)
            return
        for c in self.contribs:
            c.add_weighted_(out, a)

    def weighted_sum(self, a: torch.Tensor) -> torch.Tensor:
        """``sum_i a_i g_i`` as a new tensor of the parameter's shape (work dtype)."""
        out = torch.zeros(self.shape, dtype=self.dtype, device=self._device())
        self.add_weighted_(out, a)
        return out

    def release(self) -> None:
        """Drop every reference to captured factors and materialised gradients."""
        self.contribs = []
        self._g = self._K = self._h = self._rows = None

    def _device(self) -> torch.device:
        return self.contribs[0].device
