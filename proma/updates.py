"""The per-parameter updates of one microbatch: project (PROMA), intra, plain; each returns the new G and a record.

Index conventions: b sequences, P flattened parameter size; ``block`` is the parameter's
:class:`proma.layers.Block` (its b per-sequence gradients g_i, never formed for the whole model), ``w`` (b,)
the loss weights, ``G`` the running gradient in the work dtype or None when it is zero.

- :class:`ProjectUpdate`: ``G <- G - shrinkage * R + pg`` with R from the solver (nothing to remove when
  G = 0 or the solver is "none");
- :class:`IntraUpdate`: ``G <- G + intra_project(pg, X, D)`` for an ``nn.Linear`` weight;
- :class:`PlainUpdate`: ``G <- G + pg`` (excluded parameters, non-linear parameters under intra, and the
  autograd gradient of parameters without a rule).

Updates run in place on G when it exists, so a float32 / float64 parameter's ``p.grad`` is updated without
a copy.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .inventory import Handling
from .layers import Block
from .microbatch import IntraFactors
from .options import NO_SOLVER, AccumulatorOptions
from .intra import gradient_rows, project_factored_
from .solvers import solve
from .subspace import dominant_subspace


class UpdateMode(enum.Enum):
    """Which update a parameter got."""

    PROMA = "proma"
    INTRA = "intra"
    PLAIN = "plain"


class PlainReason(enum.Enum):
    """Why a parameter got plain accumulation (shown in the stats as ``"plain (<reason>)"``)."""

    EXCLUDED = "excluded"
    NOT_LINEAR = "intra projects nn.Linear weights only"
    NO_RULE = "no rule"


# Routes a record can name besides a Block strategy ("materialize", "ghost").
FACTORED = "factored"        # weighted sum through the factors, no Gram
AUTOGRAD = "autograd"        # a gradient from torch.autograd (parameters without a rule)
PLAIN_BACKWARD = "plain"     # variant "none": (w * seq_logp).sum().backward()


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@dataclass(frozen=True)
class UpdateRecord:
    """What one parameter's update did in a microbatch.

    Attributes
    ----------
    mode : :class:`UpdateMode`.  reason : :class:`PlainReason` of a plain update, else None.
    strategy : the block's route ("materialize", "ghost") or :data:`FACTORED`, :data:`AUTOGRAD`,
        :data:`PLAIN_BACKWARD`.
    incoming_norm : () float64 ``||pg||`` (None when nothing was measured: variant "none").
    removed_norm : () float64 ``||R||`` after the cap, before shrinkage (zero for plain updates).
    gram_rank : () int64 tensor, rank of the Gram (kept on the device until stats() reads it), None when no
        Gram was formed.
    uses : number of captured uses of the parameter.
    """

    mode: UpdateMode
    strategy: str
    incoming_norm: torch.Tensor | None = None
    removed_norm: torch.Tensor | None = None
    gram_rank: torch.Tensor | int | None = None
    uses: int = 0
    reason: PlainReason | None = None

    @property
    def label(self) -> str:
        """The stats' mode string: ``"proma"``, ``"intra"``, ``"plain"`` or ``"plain (<reason>)"``."""
        return self.mode.value if self.reason is None else f"{self.mode.value} ({self.reason.value})"

    @property
    def projected(self) -> bool:
        return self.mode in (UpdateMode.PROMA, UpdateMode.INTRA)

    def as_dict(self, rule: str) -> dict:
        """The record as :meth:`proma.ProjectedAccumulator.stats` lists it (norms as floats, the rank as an int:
        the only place the values are read back to the host)."""
        out = {"rule": rule, "strategy": self.strategy, "mode": self.label}
        if self.incoming_norm is None:
            return out
        incoming, removed = float(self.incoming_norm), float(self.removed_norm)
        rank = None if self.gram_rank is None else int(self.gram_rank)
        out.update(incoming_norm=incoming, removed_norm=removed, gram_rank=rank, uses=self.uses,
                   removed_ratio=removed / incoming if incoming > 0 else 0.0)
        return out


class ProjectUpdate:
    """PROMA: remove the solver's component of G against the microbatch's g_i, then add pg."""

    def __init__(self, options: AccumulatorOptions):
        self.options = options

    def __call__(self, block: Block, w: torch.Tensor, G: torch.Tensor | None) -> tuple[torch.Tensor, UpdateRecord]:
        o, uses = self.options, len(block.contribs)
        if G is None or o.solver == NO_SOLVER:
            # G = 0 (or solver "none") removes nothing: the update is pg alone and no Gram is needed
            pg = block.weighted_sum(w)
            record = UpdateRecord(UpdateMode.PROMA, block.strategy, pg.norm().double(), _zero(), uses=uses)
            return (pg if G is None else G.add_(pg)), record
        K, h = block.gram_and_inner(G)
        # the b x b solve runs in torch on the parameter's device (float64, no host read): nothing waits for it
        sol = solve(K, h, w, solver=o.solver, passes=o.passes, ridge=o.ridge,
                    relative_bound=o.relative_bound, P=block.P, work_dtype=block.dtype)
        block.add_weighted_(G, w.to(sol.coef.device, torch.float64) - o.shrinkage * sol.coef)
        return G, UpdateRecord(UpdateMode.PROMA, block.strategy, sol.incoming_norm, sol.removed_norm,
                               gram_rank=sol.rank, uses=uses)


class IntraUpdate:
    """Intra: add pg projected against the dominant subspaces of the weight's own activations and gradients.

    Token rows that carry no gradient (:func:`proma.intra.gradient_rows`: padding, and rows whose output gradient
    is rounding of an exact zero) are masked, not removed: removing them would read their count back.
    """

    def __init__(self, rank: int, form: str):
        self.rank, self.form = rank, form

    def __call__(self, block: Block, w: torch.Tensor, G: torch.Tensor | None,
                 factors: IntraFactors) -> tuple[torch.Tensor, UpdateRecord]:
        X, D = factors.stacked()
        new = block.weighted_sum(w)        # pg, projected in place below
        incoming = new.norm().double()
        removed = _zero().to(incoming.device)
        if self.rank > 0 and X.shape[0] > 0:
            keep = gradient_rows(D).to(block.dtype)
            D, X = D.to(block.dtype), X.to(block.dtype)
            U = dominant_subspace(D, self.rank, row_mask=keep).V.to(new.dtype)
            V = dominant_subspace(X, self.rank, row_mask=keep).V.to(new.dtype)
            removed = project_factored_(new, U, V, self.form)
        record = UpdateRecord(UpdateMode.INTRA, FACTORED, incoming, removed, uses=len(block.contribs))
        return (new if G is None else G.add_(new)), record


class PlainUpdate:
    """Plain accumulation ``G <- G + pg``, for the given reason."""

    def __init__(self, reason: PlainReason):
        self.reason = reason

    def __call__(self, block: Block, w: torch.Tensor, G: torch.Tensor | None) -> tuple[torch.Tensor, UpdateRecord]:
        new = block.weighted_sum(w)
        record = UpdateRecord(UpdateMode.PLAIN, FACTORED, new.norm().double(), _zero(), uses=len(block.contribs),
                              reason=self.reason)
        return (new if G is None else G.add_(new)), record

    @staticmethod
    def add_gradient(g: torch.Tensor, G: torch.Tensor | None,
                     work_dtype: torch.dtype) -> tuple[torch.Tensor, UpdateRecord]:
        """``G <- G + g`` for a weighted gradient ``g`` from autograd (a parameter without a rule)."""
        G = g.to(work_dtype).clone() if G is None else G.add_(g.to(G.dtype))
        return G, UpdateRecord(UpdateMode.PLAIN, AUTOGRAD, g.norm().double(), _zero(), reason=PlainReason.NO_RULE)

    @staticmethod
    def backward_record() -> UpdateRecord:
        """Record of variant "none", whose plain backward measures nothing per parameter."""
        return UpdateRecord(UpdateMode.PLAIN, PLAIN_BACKWARD)


class Updates:
    """Picks and applies each parameter's update for the accumulator's options."""

    def __init__(self, options: AccumulatorOptions):
        self.intra_variant = options.variant == "intra"
        self.project = ProjectUpdate(options)
        self.intra = IntraUpdate(options.intra_rank, options.intra_form)
        self.excluded = PlainUpdate(PlainReason.EXCLUDED)
        self.not_linear = PlainUpdate(PlainReason.NOT_LINEAR)

    def apply(self, handling: Handling, block: Block, w: torch.Tensor, G: torch.Tensor | None,
              intra: IntraFactors | None = None) -> tuple[torch.Tensor, UpdateRecord]:
        """New G and the record for a parameter handled as ``handling`` (``intra``: its factors, intra only)."""
        if handling is Handling.EXCLUDED_CAPTURED:
            return self.excluded(block, w, G)
        if self.intra_variant:
            if intra is not None and intra.usable:
                return self.intra(block, w, G, intra)
            return self.not_linear(block, w, G)
        return self.project(block, w, G)
