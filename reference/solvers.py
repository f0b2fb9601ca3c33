"""The solver declarations: one :class:`SolverDeclaration` per solver, the one place every layer reads.

Index conventions: b sequences of a microbatch, n flattened size of one block (one parameter tensor).

A solver decides which component R of the running gradient G (one block) is removed against the microbatch's
per-sequence gradients ``seq_grads`` (b, n). Its declaration holds

- ``name``, the value of the ``solver`` option everywhere (``reference.accumulate``, ``proma.AccumulatorOptions``,
  the TRL config, the oracle's case settings, the studies);
- ``options``, which of the shared solver options (:data:`SOLVER_OPTIONS`) it reads, so that labels, option
  help and the oracle's case labels name exactly those;
- ``remove``, the exact float64 NumPy definition ``remove(G (n,), seq_grads (b, n), options) -> R (n,)``: the
  judge the torch implementation (registered under the same name in :mod:`proma.solvers`) is checked against;
- ``example``, the option values of the oracle cases and study rows generated for the solver.

Every reader asks this registry (:func:`solver_names`, :func:`declaration`), so adding a solver is one
declaration plus, for the torch side, one registered function (``proma.solvers.add_solver`` does both):
see docs/extending.md. This module imports nothing but NumPy and SciPy (the reference never imports torch).

Built-in solvers (what the published paper calls its modes, plus the exact projection)
-------------------------------------------------------------------------------------
``"none"``          R = 0 (plain accumulation).
``"exact"``         R = orthogonal projection of G onto span{g_i[B]} (:func:`reference.project_out`).
``"gram_schmidt"``  the published quick mode: n_i = g_i / ||g_i||, then ``passes`` sweeps of
                    ``G <- G - <G, n_i> n_i`` over i in order; R = G_before - G_after.
``"ridge"``         the published regularised mode: N rows n_i (unit-normalised), K = N N^T,
                    c = (K + ridge I)^{-1} N G, R = c^T N.

Zero rows: the normalised solvers skip sequences with ``g_i = 0`` exactly (they carry no direction). This is
the same as treating their n_i as the zero vector: a zero n_i does nothing in a Gram-Schmidt sweep, and in
the ridge system it gets c_i = 0 without changing the other coefficients. Implementations that normalise
with ``g / max(||g||, tiny)`` therefore agree with the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, NamedTuple

import numpy as np
import scipy.linalg

from .projection import project_out

# The option defaults, mirroring proma.options (the reference imports nothing of proma; equality is checked by
# tests/house/test_options_mirror.py).
DEFAULT_PASSES = 2
DEFAULT_RIDGE = 1e-2
# The options a solver may read besides G and the rows (every one is an option of accumulate / the accumulator)
SOLVER_OPTIONS = ("passes", "ridge", "rcond")


class SolverOptions(NamedTuple):
    """What a solver may use besides G and the rows: Gram-Schmidt sweeps, ridge regulariser, exact cutoff."""

    passes: int
    ridge: float
    rcond: float | None


@dataclass(frozen=True)
class SolverDeclaration:
    """One solver, declared once (see the module docstring).

    Attributes
    ----------
    name : str, the ``solver`` option's value (letters, digits and ``_``).
    summary : str, one line: what R is.
    remove : callable ``(G (n,), seq_grads (b, n), SolverOptions) -> R (n,)``, float64 NumPy.
    options : tuple of names from :data:`SOLVER_OPTIONS` that ``remove`` reads.
    example : dict, option values (keys within ``options``) of the generated oracle cases and study rows.
    """

    name: str
    summary: str
    remove: Callable
    options: tuple = ()
    example: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.replace("_", "").isalnum():
            raise ValueError(f"a solver name must be a non-empty identifier of letters, digits and '_'; "
                             f"got {self.name!r}")
        if not callable(self.remove):
            raise ValueError(f"solver {self.name!r}: remove must be callable; got {type(self.remove).__name__}")
        unknown = [o for o in self.options if o not in SOLVER_OPTIONS]
        if unknown:
            raise ValueError(f"solver {self.name!r}: options {unknown} are not solver options {SOLVER_OPTIONS}")
        extra = [k for k in self.example if k not in self.options]
        if extra:
            raise ValueError(f"solver {self.name!r}: example sets {extra}, which are not among its options "
                             f"{tuple(self.options)}")
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "example", dict(self.example))


def _unit_rows(g: np.ndarray) -> np.ndarray:
    """Non-zero rows of g scaled to unit norm (divided by their max first, so tiny rows do not underflow)."""
    peak = np.abs(g).max(axis=1) if g.size else np.zeros(g.shape[0])
    keep = peak > 0.0
    rows = g[keep] / peak[keep, None]
    return rows / np.linalg.norm(rows, axis=1)[:, None]


unit_rows = _unit_rows  # public name for solver authors (docs/extending.md)


def _remove_nothing(G: np.ndarray, seq_grads: np.ndarray, options: SolverOptions) -> np.ndarray:
    """Solver "none": R = 0."""
    return np.zeros_like(G)


def _remove_exact(G: np.ndarray, seq_grads: np.ndarray, options: SolverOptions) -> np.ndarray:
    """Solver "exact": R = orthogonal projection of G onto the row span of ``seq_grads``."""
    return G - project_out(G, seq_grads, rcond=options.rcond)


def _remove_gram_schmidt(G: np.ndarray, seq_grads: np.ndarray, options: SolverOptions) -> np.ndarray:
    """Solver "gram_schmidt": ``options.passes`` sweeps of G <- G - <G, n_i> n_i over the unit rows n_i."""
    units = _unit_rows(seq_grads)
    if units.shape[0] == 0:
        return np.zeros_like(G)
    out = G.copy()
    for _ in range(options.passes):
        for u in units:
            out -= (out @ u) * u
    return G - out


def _remove_ridge(G: np.ndarray, seq_grads: np.ndarray, options: SolverOptions) -> np.ndarray:
    """Solver "ridge": c = (N N^T + ridge I)^{-1} N G on the unit rows N, R = c^T N."""
    units = _unit_rows(seq_grads)
    if units.shape[0] == 0:
        return np.zeros_like(G)
    # K + ridge I is symmetric positive definite for ridge > 0
    gram = units @ units.T
    coef = scipy.linalg.solve(gram + options.ridge * np.eye(units.shape[0]), units @ G, assume_a="pos")
    return coef @ units


BUILTIN_DECLARATIONS = (
    SolverDeclaration("none", "R = 0 (plain accumulation through the same machinery)", _remove_nothing),
    SolverDeclaration("exact", "R = orthogonal projection of G onto span{g_i}", _remove_exact, ("rcond",)),
    SolverDeclaration("gram_schmidt", "passes sweeps of G <- G - <G, n_i> n_i over the unit rows n_i (published)",
                      _remove_gram_schmidt, ("passes",), {"passes": DEFAULT_PASSES}),
    SolverDeclaration("ridge", "c = (N N^T + ridge I)^{-1} N G on the unit rows N, R = c^T N (published)",
                      _remove_ridge, ("ridge",), {"ridge": DEFAULT_RIDGE}),
)
# name -> declaration, in declaration order
_DECLARED: dict[str, SolverDeclaration] = {d.name: d for d in BUILTIN_DECLARATIONS}
# read-only live view of the registry (``name in DECLARATIONS``, iteration in declaration order)
DECLARATIONS = MappingProxyType(_DECLARED)
# the built-in names (a fixed tuple; :func:`solver_names` is the live list, with declared ones)
BUILTIN_SOLVERS = tuple(d.name for d in BUILTIN_DECLARATIONS)


def declare(decl: SolverDeclaration) -> SolverDeclaration:
    """Add ``decl`` to the registry; refuses a name already declared (ValueError). Returns ``decl``."""
    if not isinstance(decl, SolverDeclaration):
        raise ValueError(f"declare takes a SolverDeclaration; got {type(decl).__name__}")
    if decl.name in _DECLARED:
        raise ValueError(f"solver {decl.name!r} is already declared; undeclare it first")
    _DECLARED[decl.name] = decl
    return decl


def undeclare(name: str) -> None:
    """Remove a solver added with :func:`declare` (the built-ins cannot be removed)."""
    if name in BUILTIN_SOLVERS:
        raise ValueError(f"solver {name!r} is built in and cannot be undeclared")
    if name not in _DECLARED:
        raise ValueError(f"solver {name!r} is not declared; declared: {solver_names()}")
    del _DECLARED[name]


def solver_names() -> tuple:
    """Every declared solver name, in declaration order (built-ins first)."""
    return tuple(_DECLARED)


def declaration(name: str) -> SolverDeclaration:
    """The declaration of ``name``; ValueError naming the declared solvers when there is none."""
    try:
        return _DECLARED[name]
    except (KeyError, TypeError):
        raise ValueError(f"solver must be one of {solver_names()}; got {name!r}") from None
