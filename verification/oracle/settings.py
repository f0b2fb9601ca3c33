"""The oracle case format's settings and layer objects, the option names they allow, and :class:`FormatError`.

Part of FORMAT.md's executable form (:mod:`verification.oracle.format` re-exports everything here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import reference

# Option names and defaults come from the judge (reference), which mirrors proma.options under
# tests/house/test_options_mirror.py. Solvers are the judge's declarations (reference.solvers): a declared
# solver is a valid case setting with no change here. The reference's "none" solver is variant "none" here.
VARIANTS = ("none", "proma", "intra")
NO_SOLVER = "none"
SOLVERS = tuple(name for name in reference.SOLVERS if name != NO_SOLVER)  # the built-ins


def case_solvers() -> tuple:
    """The solvers a case may name now: every declared one (reference.solvers) but "none"."""
    return tuple(name for name in reference.solver_names() if name != NO_SOLVER)
INTRA_FORMS = reference.FORMS
USE_KINDS = ("linear", "dense")


class FormatError(ValueError):
    """A case directory, case archive or candidate file does not follow FORMAT.md."""


def is_int(x) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A finite real number (Python or NumPy), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Settings:
    """The accumulation a case asks for (see FORMAT.md, "settings")."""

    variant: str = "proma"
    solver: str = "exact"
    passes: int = reference.DEFAULT_PASSES
    ridge: float = reference.DEFAULT_RIDGE
    relative_bound: float | None = None
    shrinkage: float = 1.0
    intra_rank: int = 1
    intra_form: str = "two_sided"

    def to_json(self) -> dict:
        return {
            "variant": self.variant, "solver": self.solver, "passes": self.passes, "ridge": self.ridge,
            "relative_bound": self.relative_bound, "shrinkage": self.shrinkage,
            "intra_rank": self.intra_rank, "intra_form": self.intra_form,
        }

    @classmethod
    def from_json(cls, obj, where: str) -> "Settings":
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: settings must be an object; got {type(obj).__name__}")
        expected = set(cls().to_json())
        if set(obj) != expected:
            missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
            raise FormatError(f"{where}: settings keys wrong (missing {missing}, unknown {extra})")
        s = cls(**obj)
        s.validate(where)
        return s

    def validate(self, where: str) -> None:
        def bad(msg):
            raise FormatError(f"{where}: settings.{msg}")

        if self.variant not in VARIANTS:
            bad(f"variant must be one of {VARIANTS}; got {self.variant!r}")
        if self.solver not in case_solvers():
            bad(f"solver must be one of {case_solvers()}; got {self.solver!r}")
        if not is_int(self.passes) or self.passes < 1:
            bad(f"passes must be an integer >= 1; got {self.passes!r}")
        if not is_real(self.ridge) or not self.ridge > 0:
            bad(f"ridge must be a number > 0; got {self.ridge!r}")
        if self.relative_bound is not None and (not is_real(self.relative_bound) or self.relative_bound < 0):
            bad(f"relative_bound must be null or a number >= 0; got {self.relative_bound!r}")
        if not is_real(self.shrinkage):
            bad(f"shrinkage must be a finite number; got {self.shrinkage!r}")
        if not is_int(self.intra_rank) or self.intra_rank < 0:
            bad(f"intra_rank must be an integer >= 0; got {self.intra_rank!r}")
        if self.intra_form not in INTRA_FORMS:
            bad(f"intra_form must be one of {INTRA_FORMS}; got {self.intra_form!r}")

    def label(self) -> str:
        """Short human label, e.g. ``proma/gram_schmidt(passes=2, bound=0.5)``."""
        if self.variant == "none":
            return "none"
        if self.variant == "intra":
            return f"intra/{self.intra_form}(rank={self.intra_rank})"
        # the options the solver's declaration says it reads (rcond is not a case setting)
        shown = {"passes": f"passes={self.passes}", "ridge": f"ridge={self.ridge:g}"}
        declared = reference.SOLVER_REGISTRY.get(self.solver)
        opts = ", ".join(shown[o] for o in getattr(declared, "options", ()) if o in shown)
        extra = [o for o in (opts,
                             f"bound={self.relative_bound:g}" if self.relative_bound is not None else "",
                             f"shrinkage={self.shrinkage:g}" if self.shrinkage != 1.0 else "") if o]
        return f"proma/{self.solver}" + (f"({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class Layer:
    """One parameter tensor (one projection block): its name, shape and the kinds of its uses."""

    name: str
    shape: tuple
    uses: tuple

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "uses": list(self.uses)}

    @classmethod
    def from_json(cls, obj, where: str) -> "Layer":
        if not isinstance(obj, dict) or set(obj) != {"name", "shape", "uses"}:
            raise FormatError(f"{where}: a layer must be an object with keys name, shape, uses; got {obj!r}")
        shape, uses = obj["shape"], obj["uses"]
        if not isinstance(shape, list) or not shape or not all(is_int(d) and d >= 1 for d in shape):
            raise FormatError(f"{where}: shape must be a non-empty list of positive integers; got {shape!r}")
        if not isinstance(uses, list) or not uses or not all(u in USE_KINDS for u in uses):
            raise FormatError(f"{where}: uses must be a non-empty list of {USE_KINDS}; got {uses!r}")
        if "linear" in uses and len(shape) != 2:
            raise FormatError(f"{where}: a layer with a linear use must have a 2-D shape (o, i); got {shape}")
        return cls(name=str(obj["name"]), shape=tuple(int(d) for d in shape), uses=tuple(uses))
