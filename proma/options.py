"""The accumulator's options: the enumerations, one frozen dataclass validated once, and the published preset.

Every module that needs a variant, solver, sync mode, intra form or strategy name imports it from here
(``SOLVERS`` is the solver registry's key list, :data:`proma.projection.SOLVER_REGISTRY`; ``STRATEGIES`` the
per-layer routes of :mod:`proma.layers.block`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .layers.block import DEFAULT_MAX_TRANSIENT, STRATEGIES
from .projection import DEFAULT_PASSES, DEFAULT_RIDGE, SOLVERS

VARIANTS = ("proma", "none", "intra")
# "none" as a solver: variant "proma" that removes nothing (plain accumulation through the layer rules)
NO_SOLVER = "none"
ACCUMULATOR_SOLVERS = SOLVERS + (NO_SOLVER,)
SYNCS = ("local", "global")
INTRA_FORMS = ("two_sided", "kron")

__all__ = ["VARIANTS", "SOLVERS", "NO_SOLVER", "ACCUMULATOR_SOLVERS", "SYNCS", "INTRA_FORMS", "STRATEGIES",
           "AccumulatorOptions", "PUBLISHED", "PUBLISHED_NAME", "PUBLISHED_SETTINGS", "published_options"]


def _is_int(x, minimum: int) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and x >= minimum


@dataclass(frozen=True)
class AccumulatorOptions:
    """Every option of :class:`proma.ProjectedAccumulator`, checked once on construction.

    Attributes
    ----------
    variant : {"proma", "none", "intra"}
    solver : {"exact", "gram_schmidt", "ridge", "none"}
        Projection of ``variant="proma"`` (see :mod:`proma.projection`).
    passes : int >= 1, Gram-Schmidt sweeps.  ridge : float > 0, ridge regulariser.
    relative_bound : float >= 0 or None
        Cap ``||R_m|| <= relative_bound * ||pg_m||`` per parameter tensor.
    shrinkage : float, multiplier of the removed component.
    intra_rank : int >= 0, intra_form : {"two_sided", "kron"}
        Options of ``variant="intra"``.
    strategy : {"auto", "materialize", "ghost"}
        Route for the per-layer Gram (see :mod:`proma.layers.block`).
    exclude : frozenset of str
        Names of trainable parameters that get plain accumulation (a single name is accepted too).
    max_transient : int, largest number of elements of a materialised per-sequence gradient chunk.
    sync : {"local", "global"}, how ``variant="proma"`` projects across ranks.

    Raises
    ------
    ValueError naming the first invalid option.
    """

    variant: str = "proma"
    solver: str = "exact"
    passes: int = DEFAULT_PASSES
    ridge: float = DEFAULT_RIDGE
    relative_bound: float | None = None
    shrinkage: float = 1.0
    intra_rank: int = 1
    intra_form: str = "two_sided"
    strategy: str = "auto"
    exclude: frozenset = frozenset()
    max_transient: int = DEFAULT_MAX_TRANSIENT
    sync: str = "local"

    def __post_init__(self):
        self._check_names()
        self._check_numbers()
        exclude = self._checked_exclude()
        normalised = dict(ridge=float(self.ridge), shrinkage=float(self.shrinkage), exclude=frozenset(exclude),
                          max_transient=int(self.max_transient),
                          relative_bound=None if self.relative_bound is None else float(self.relative_bound))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def _check_names(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {self.variant!r}")
        if self.solver not in ACCUMULATOR_SOLVERS:
            raise ValueError(f"solver must be one of {ACCUMULATOR_SOLVERS}; got {self.solver!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}")
        if self.sync not in SYNCS:
            raise ValueError(f"sync must be one of {SYNCS}; got {self.sync!r}")
        if self.sync == "global" and self.variant == "intra":
            raise ValueError("sync='global' is defined for variant='proma' (intra projects each microbatch on its "
                             "own, so each rank projects its own microbatches); use sync='local'")
        if self.intra_form not in INTRA_FORMS:
            raise ValueError(f"intra_form must be one of {INTRA_FORMS}; got {self.intra_form!r}")

    def _check_numbers(self) -> None:
        if not _is_int(self.passes, 1):
            raise ValueError(f"passes must be an int >= 1; got {self.passes!r}")
        if not _is_int(self.intra_rank, 0):
            raise ValueError(f"intra_rank must be an int >= 0; got {self.intra_rank!r}")
        if not (math.isfinite(float(self.ridge)) and float(self.ridge) > 0):
            raise ValueError(f"ridge must be a finite float > 0; got {self.ridge!r}")
        bound = self.relative_bound
        if bound is not None and not (math.isfinite(float(bound)) and bound >= 0):
            raise ValueError(f"relative_bound must be None or a finite float >= 0; got {bound!r}")
        if not math.isfinite(float(self.shrinkage)):
            raise ValueError(f"shrinkage must be a finite float; got {self.shrinkage!r}")
        if not _is_int(self.max_transient, 1):
            raise ValueError(f"max_transient must be an int >= 1 (elements of a materialised per-sequence gradient "
                             f"chunk); got {self.max_transient!r}")

    def _checked_exclude(self) -> tuple:
        """``exclude`` as a tuple of names: one parameter name, or an iterable of names (read once)."""
        if isinstance(self.exclude, str):
            return (self.exclude,)
        try:
            names = list(self.exclude)
        except TypeError:
            raise ValueError(f"exclude must be a parameter name or an iterable of names; got "
                             f"{type(self.exclude).__name__} {self.exclude!r}") from None
        wrong = [n for n in names if not isinstance(n, str)]
        if wrong:
            raise ValueError(f"exclude must hold parameter names (str); got {wrong[0]!r} "
                             f"({type(wrong[0]).__name__})")
        return tuple(names)

    def replace(self, **changes) -> "AccumulatorOptions":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The options as ``ProjectedAccumulator`` keyword arguments (``exclude`` as a sorted tuple)."""
        kw = dataclasses.asdict(self)
        kw["exclude"] = tuple(sorted(self.exclude))
        return kw

    def signature_items(self) -> tuple:
        """What every rank of a data-parallel run must agree on (hashed into the sync header)."""
        return (self.variant, self.sync, self.solver, self.passes, self.ridge, self.relative_bound, self.shrinkage,
                self.intra_rank, self.intra_form, sorted(self.exclude))


# The settings of the published PROMA run (Gram-Schmidt, two sweeps, removal capped at half the incoming
# microbatch gradient); proma.rl calls this method "proma-paper".
PUBLISHED_NAME = "proma-paper"
# The options that differ from the defaults, as keywords (for callers that take a keyword dict).
PUBLISHED_SETTINGS = {"variant": "proma", "solver": "gram_schmidt", "passes": 2, "relative_bound": 0.5, "shrinkage": 1.0}
PUBLISHED = AccumulatorOptions(**PUBLISHED_SETTINGS)


def published_options(**changes) -> AccumulatorOptions:
    """:data:`PUBLISHED`, with ``changes`` (e.g. ``strategy=``, ``sync=``) applied."""
    return PUBLISHED.replace(**changes) if changes else PUBLISHED
