"""The oracle case format (schema version 2; version 1 still read): case objects, array names, load, save.

The normative description is ``verification/FORMAT.md``; this module is its executable form. Index
conventions: b sequences of a microbatch, t tokens, i in-features, o out-features, P parameter size;
microbatch m, layer (parameter tensor) k, use u of that layer.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import reference

FORMAT_NAME = "proma-verify-cases"
SCHEMA_VERSION = 2
# version 1 differed only in its pass test (atol was added to every tolerance); its directories still load and
# are judged by the version-2 test, which is stricter for small scales
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# Option names and defaults come from the judge (reference), which mirrors proma.options under
# tests/house/test_options_mirror.py: a new solver is one reference function and one registry line. Its "none"
# solver is variant "none" here.
VARIANTS = ("none", "proma", "intra")
SOLVERS = tuple(name for name in reference.SOLVERS if name != "none")
INTRA_FORMS = reference.FORMS
USE_KINDS = ("linear", "dense")
LINEAR_ARRAYS = ("X", "D", "seq")
DENSE_ARRAYS = ("seq_grads",)
EXPECTED_ARRAYS = ("G_in", "pg", "G_out")

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FormatError(ValueError):
    """A case directory, case archive or candidate file does not follow FORMAT.md."""


# ----------------------------------------------------------------------------------------------- names
def weights_key(m: int) -> str:
    """``mb{m}/weights``: per-sequence loss weights, shape (b_m,)."""
    return f"mb{m}/weights"


def use_key(m: int, k: int, u: int, name: str) -> str:
    """``mb{m}/layer{k}/use{u}/{name}`` with name in X, D, seq (linear) or seq_grads (dense)."""
    return f"mb{m}/layer{k}/use{u}/{name}"


def layer_key(m: int, k: int, name: str) -> str:
    """``mb{m}/layer{k}/{name}`` with name in G_in, pg, G_out (expected arrays), layer shape."""
    return f"mb{m}/layer{k}/{name}"


def candidate_key(case_id: str, m: int, k: int) -> str:
    """``{case_id}/mb{m}/layer{k}/G_out``: a candidate's running gradient after microbatch m."""
    return f"{case_id}/mb{m}/layer{k}/G_out"


# -------------------------------------------------------------------------------------------- objects
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
        if self.solver not in SOLVERS:
            bad(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if not _is_int(self.passes) or self.passes < 1:
            bad(f"passes must be an integer >= 1; got {self.passes!r}")
        if not _is_real(self.ridge) or not self.ridge > 0:
            bad(f"ridge must be a number > 0; got {self.ridge!r}")
        if self.relative_bound is not None and (not _is_real(self.relative_bound) or self.relative_bound < 0):
            bad(f"relative_bound must be null or a number >= 0; got {self.relative_bound!r}")
        if not _is_real(self.shrinkage):
            bad(f"shrinkage must be a finite number; got {self.shrinkage!r}")
        if not _is_int(self.intra_rank) or self.intra_rank < 0:
            bad(f"intra_rank must be an integer >= 0; got {self.intra_rank!r}")
        if self.intra_form not in INTRA_FORMS:
            bad(f"intra_form must be one of {INTRA_FORMS}; got {self.intra_form!r}")

    def label(self) -> str:
        """Short human label, e.g. ``proma/gram_schmidt(passes=2, bound=0.5)``."""
        if self.variant == "none":
            return "none"
        if self.variant == "intra":
            return f"intra/{self.intra_form}(rank={self.intra_rank})"
        opts = {"gram_schmidt": f"passes={self.passes}", "ridge": f"ridge={self.ridge:g}"}.get(self.solver, "")
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
        if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 1 for d in shape):
            raise FormatError(f"{where}: shape must be a non-empty list of positive integers; got {shape!r}")
        if not isinstance(uses, list) or not uses or not all(u in USE_KINDS for u in uses):
            raise FormatError(f"{where}: uses must be a non-empty list of {USE_KINDS}; got {uses!r}")
        if "linear" in uses and len(shape) != 2:
            raise FormatError(f"{where}: a layer with a linear use must have a 2-D shape (o, i); got {shape}")
        return cls(name=str(obj["name"]), shape=tuple(int(d) for d in shape), uses=tuple(uses))


@dataclass
class Case:
    """One oracle case: settings, layers, microbatch boundaries and the arrays of its ``.npz``.

    ``arrays`` maps the FORMAT.md keys (``mb{m}/weights``, ``mb{m}/layer{k}/use{u}/X`` ...) to arrays.
    """

    id: str
    description: str
    settings: Settings
    layers: list
    boundaries: list
    arrays: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)

    @property
    def n_microbatches(self) -> int:
        return len(self.boundaries) - 1

    def batch_size(self, m: int) -> int:
        return self.boundaries[m + 1] - self.boundaries[m]

    def array(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            raise FormatError(f"case {self.id!r}: missing array {key!r}") from None

    def weights(self, m: int) -> np.ndarray:
        return self.array(weights_key(m))

    def use(self, m: int, k: int, u: int) -> dict:
        """The arrays of use u of layer k in microbatch m: ``{X, D, seq}`` or ``{seq_grads}``."""
        names = LINEAR_ARRAYS if self.layers[k].uses[u] == "linear" else DENSE_ARRAYS
        return {n: self.array(use_key(m, k, u, n)) for n in names}

    def expected(self, m: int, k: int, name: str = "G_out") -> np.ndarray:
        return self.array(layer_key(m, k, name))

    def manifest_entry(self) -> dict:
        return {
            "id": self.id, "file": f"{self.id}.npz", "description": self.description, "tags": list(self.tags),
            "settings": self.settings.to_json(), "layers": [layer.to_json() for layer in self.layers],
            "microbatch_boundaries": list(self.boundaries),
        }

    def required_keys(self, *, expected: bool = True) -> list:
        keys = []
        for m in range(self.n_microbatches):
            keys.append(weights_key(m))
            for k, layer in enumerate(self.layers):
                for u, kind in enumerate(layer.uses):
                    names = LINEAR_ARRAYS if kind == "linear" else DENSE_ARRAYS
                    keys += [use_key(m, k, u, n) for n in names]
                if expected:
                    keys += [layer_key(m, k, n) for n in EXPECTED_ARRAYS]
        return keys


def default_tolerances() -> dict:
    """Pass-test tolerances per candidate dtype (FORMAT.md, "Pass test"): the project's named tolerances.

    ``rtol`` bounds the error relative to the array's own scale; ``atol`` is used only where that scale is 0
    (every expected array of the layer is zero: then the candidate must be zero to within it).
    """
    from ..tolerances import FLOAT32_ATOL, FLOAT32_RTOL, FLOAT64_ATOL, FLOAT64_RTOL

    return {"float64": {"rtol": FLOAT64_RTOL, "atol": FLOAT64_ATOL},
            "float32": {"rtol": FLOAT32_RTOL, "atol": FLOAT32_ATOL}}


# --------------------------------------------------------------------------------------------- checks
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def validate_case(case: Case, *, expected: bool = True) -> None:
    """Check that every array of ``case`` is present, well shaped, finite and of the right dtype.

    Raises
    ------
    FormatError
        Naming the case and the offending array.
    """
    where = f"case {case.id!r}"
    if not isinstance(case.id, str) or not _CASE_ID.match(case.id):
        raise FormatError(f"case id {case.id!r} must match {_CASE_ID.pattern}")
    case.settings.validate(where)
    if not case.layers:
        raise FormatError(f"{where}: must have at least one layer")
    c = case.boundaries
    if (not isinstance(c, list) or len(c) < 2 or c[0] != 0 or not all(_is_int(v) for v in c)
            or any(b <= a for a, b in zip(c[:-1], c[1:]))):
        raise FormatError(f"{where}: microbatch_boundaries must be [0, c_1, ..., c_M] strictly increasing; got {c!r}")

    required = case.required_keys(expected=expected)
    missing = [key for key in required if key not in case.arrays]
    if missing:
        raise FormatError(f"{where}: missing array {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    allowed = set(case.required_keys(expected=True))
    extra = sorted(set(case.arrays) - allowed)
    if extra:
        raise FormatError(f"{where}: unknown array {extra[0]!r} (FORMAT.md lists the allowed keys)")
    for m in range(case.n_microbatches):
        _validate_microbatch(case, m, where, expected)


def _checked_array(case: Case, key: str, shape: tuple, where: str, kind: str = "f") -> np.ndarray:
    """``case.arrays[key]`` checked: an ndarray of float64 (``kind="f"``, finite) or integers (``"i"``) of
    ``shape`` (``None`` matches any length)."""
    a = case.arrays[key]
    if not isinstance(a, np.ndarray):
        raise FormatError(f"{where}: array {key!r} is not an ndarray")
    if kind == "f" and a.dtype != np.float64:
        raise FormatError(f"{where}: array {key!r} must be float64; got {a.dtype}")
    if kind == "i" and not np.issubdtype(a.dtype, np.integer):
        raise FormatError(f"{where}: array {key!r} must be an integer array; got {a.dtype}")
    if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise FormatError(f"{where}: array {key!r} has shape {a.shape}; expected {want}")
    if kind == "f" and not np.all(np.isfinite(a)):
        raise FormatError(f"{where}: array {key!r} contains NaN or inf")
    return a


def _validate_microbatch(case: Case, m: int, where: str, expected: bool) -> None:
    """The arrays of microbatch m: weights (b,), each use's factors or seq_grads, the expected arrays."""
    b = case.batch_size(m)
    _checked_array(case, weights_key(m), (b,), where)
    for k, layer in enumerate(case.layers):
        for u, kind in enumerate(layer.uses):
            if kind == "dense":
                _checked_array(case, use_key(m, k, u, "seq_grads"), (b, *layer.shape), where)
                continue
            o, i = layer.shape
            t = _checked_array(case, use_key(m, k, u, "X"), (None, i), where).shape[0]
            _checked_array(case, use_key(m, k, u, "D"), (t, o), where)
            seq = _checked_array(case, use_key(m, k, u, "seq"), (t,), where, kind="i")
            if t and (seq.min() < 0 or seq.max() >= b):
                raise FormatError(f"{where}: array {use_key(m, k, u, 'seq')!r} holds sequence indices outside "
                                  f"0..{b - 1}")
        if expected:
            for name in EXPECTED_ARRAYS:
                _checked_array(case, layer_key(m, k, name), layer.shape, where)


# --------------------------------------------------------------------------------------- load / save
def load_cases(cases_dir, *, only=None) -> tuple[list, dict]:
    """Load and validate a case directory.

    Parameters
    ----------
    cases_dir : path
        Directory holding ``manifest.json`` and the ``.npz`` archives.
    only : iterable of str, optional
        Case ids to load (unknown ids raise).

    Returns
    -------
    cases : list of Case
    manifest : dict
        The parsed manifest (tolerances, generator).
    """
    from .manifest import case_from_entry, read_manifest

    cases_dir = Path(cases_dir)
    manifest = read_manifest(cases_dir)
    entries = manifest["cases"]
    ids = [e.get("id") if isinstance(e, dict) else None for e in entries]
    if len(set(ids)) != len(ids):
        raise FormatError(f"{cases_dir / MANIFEST}: case ids are not unique")
    if only is not None:
        only = list(only)
        unknown = [c for c in only if c not in ids]
        if unknown:
            raise FormatError(f"unknown case id(s) {unknown}; the manifest has {ids}")
    cases = []
    for index, entry in enumerate(entries):
        if only is not None and entry.get("id") not in only:
            continue
        case = case_from_entry(entry, cases_dir, index)
        validate_case(case)
        cases.append(case)
    return cases, manifest


def save_cases(cases_dir, cases, *, generator: dict | None = None, tolerances: dict | None = None) -> Path:
    """Validate ``cases`` (with expected arrays) and write them with a manifest; returns the manifest path."""
    cases_dir = Path(cases_dir)
    cases_dir.mkdir(parents=True, exist_ok=True)
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise FormatError(f"case ids are not unique: {ids}")
    for case in cases:
        validate_case(case)
    for case in cases:
        np.savez_compressed(cases_dir / f"{case.id}.npz", **case.arrays)
    manifest = {
        "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "generator": generator or {},
        "tolerances": tolerances or default_tolerances(), "cases": [c.manifest_entry() for c in cases],
    }
    path = cases_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
