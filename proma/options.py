"""The accumulator's options: the enumerations, one frozen dataclass validated once, and the published preset.

Every module that needs a variant, solver, sync mode, intra form or strategy name imports it from here.
Solvers are declared in :mod:`reference.solvers` (with their torch implementations in :mod:`proma.solvers`):
``solver`` is checked against :func:`proma.solvers.solver_names`, the live list, so an added solver is
accepted everywhere; ``SOLVERS`` / ``ACCUMULATOR_SOLVERS`` are the built-ins. ``STRATEGIES`` are the
per-layer routes of :mod:`proma.layers.block`.

``variant="none"`` and ``solver="none"`` both leave the microbatch gradients unprojected, by different roads:
``variant="none"`` is plain autograd (``(weights * seq_logp).sum().backward()``, no hooks), the baseline a
user compares against; ``solver="none"`` runs the whole PROMA machinery (hooks, layer rules, updates) and
removes nothing, the baseline for the machinery's own cost and rounding.

``sync`` defaults to ``"local"`` here (each rank projects its own microbatches, then one all-reduce: the
cheap setting, and the one every single-process run means); the RL harness's ``--sync`` defaults to
``"global"`` on purpose (its several-process runs reproduce the single-process result up to rounding, which
is what a study compares), see proma/rl/config.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .layers.block import DEFAULT_MAX_TRANSIENT, STRATEGIES
from .solvers import DEFAULT_PASSES, DEFAULT_RIDGE, NO_SOLVER, SOLVERS, solver_names

VARIANTS = ("proma", "none", "intra")
# the built-in solvers plus "none" (the live list, with added solvers: proma.solvers.solver_names())
ACCUMULATOR_SOLVERS = SOLVERS + (NO_SOLVER,)
SYNCS = ("local", "global")
# options each rank may choose for itself (how it computes, not what): left out of the ranks' agreement check
RANK_LOCAL_OPTIONS = ("strategy", "max_transient")
INTRA_FORMS = ("two_sided", "kron")

__all__ = ["VARIANTS", "SOLVERS", "NO_SOLVER", "ACCUMULATOR_SOLVERS", "solver_names", "SYNCS", "INTRA_FORMS", "STRATEGIES",
           "AccumulatorOptions", "PUBLISHED", "PUBLISHED_NAME", "PUBLISHED_SETTINGS", "published_options",
           "options_from_fields"]


def _is_int(x, minimum: int) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and x >= minimum


@dataclass(frozen=True)
class AccumulatorOptions:
    """Every option of :class:`proma.ProjectedAccumulator`, checked once on construction.

    Attributes
    ----------
    variant : {"proma", "none", "intra"}
    solver : {"exact", "gram_schmidt", "ridge", "none"} or an added solver
        Projection of ``variant="proma"`` (see :mod:`reference.solvers`, :mod:`proma.solvers`).
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
        if self.solver not in solver_names():
            raise ValueError(f"solver must be one of {solver_names()}; got {self.solver!r}")
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
        """What every rank of a data-parallel run must agree on (hashed into the sync header): every option but
        the per-rank memory and route choices of :data:`RANK_LOCAL_OPTIONS`, read from the fields (so a new
        option is in it unless it is declared rank-local)."""
        return tuple((f.name, sorted(self.exclude) if f.name == "exclude" else getattr(self, f.name))
                     for f in dataclasses.fields(self) if f.name not in RANK_LOCAL_OPTIONS)


# The settings of the published PROMA run (Gram-Schmidt, two sweeps, removal capped at half the incoming
# microbatch gradient); proma.rl calls this method "proma-paper".
PUBLISHED_NAME = "proma-paper"
# The options that differ from the defaults, as keywords (for callers that take a keyword dict).
PUBLISHED_SETTINGS = {"variant": "proma", "solver": "gram_schmidt", "passes": 2, "relative_bound": 0.5, "shrinkage": 1.0}
PUBLISHED = AccumulatorOptions(**PUBLISHED_SETTINGS)


def published_options(**changes) -> AccumulatorOptions:
    """:data:`PUBLISHED`, with ``changes`` (e.g. ``strategy=``, ``sync=``) applied."""
    return PUBLISHED.replace(**changes) if changes else PUBLISHED


def options_from_fields(values: dict, prefix: str) -> AccumulatorOptions:
    """An integration's ``{option: value}`` (its config's fields ``prefix + option``) checked by
    :class:`AccumulatorOptions`; ValueError names the field, ``prefix + option``.

    Each option is checked alone first (the others at their defaults), so that the error names the one that is
    wrong; then all together (options that do not go together, e.g. sync='global' with variant='intra').
    """
    exclude = values.get("exclude", ())
    bad = [x for x in exclude if not isinstance(x, str)]
    if bad:
        raise ValueError(f"{prefix}exclude={list(exclude)!r} is invalid: it must be a list of parameter names "
                         f"(str); got {bad!r}")
    for name, value in values.items():
        try:
            AccumulatorOptions(**{name: value})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{prefix}{name}={value!r} is invalid: {e}") from None
    try:
        return AccumulatorOptions(**values)
    except (TypeError, ValueError) as e:
        defaults = AccumulatorOptions()
        changed = {f"{prefix}{k}": v for k, v in values.items() if k != "exclude" and v != getattr(defaults, k)}
        raise ValueError(f"the options {changed} do not go together: {e}") from None
