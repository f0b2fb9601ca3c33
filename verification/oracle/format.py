"""The oracle case format (schema version 2; version 1 still read): case objects, array names, load, save.

The normative description is ``verification/FORMAT.md``; this module is its executable form. Index
conventions: b sequences of a microbatch, t tokens, i in-features, o out-features, P parameter size;
microbatch m, layer (parameter tensor) k, use u of that layer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .settings import (  # noqa: F401  (re-exported: the format's public names)
    INTRA_FORMS, SOLVERS, USE_KINDS, VARIANTS, FormatError, Layer, Settings, is_int, is_real)

FORMAT_NAME = "proma-verify-cases"
SCHEMA_VERSION = 2
# version 1 differed only in its pass test (atol was added to every tolerance); its directories still load and
# are judged by the version-2 test, which is stricter for small scales
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

LINEAR_ARRAYS = ("X", "D", "seq")
DENSE_ARRAYS = ("seq_grads",)
EXPECTED_ARRAYS = ("G_in", "pg", "G_out")

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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

    def __repr__(self) -> str:
        # short on purpose: pytest prints a failing test's arguments, and the arrays would fill the screen
        return (f"Case({self.id!r}, {self.settings.label()}, {self.n_microbatches} microbatches, "
                f"{len(self.layers)} layers)")

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
    if (not isinstance(c, list) or len(c) < 2 or c[0] != 0 or not all(is_int(v) for v in c)
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
def read_manifest(cases_dir) -> dict:
    """Read and check the top level of ``DIR/manifest.json`` (format name, schema version, tolerances)."""
    path = Path(cases_dir) / MANIFEST
    if not path.is_file():
        raise FormatError(f"{path}: no manifest (is {cases_dir} a case directory made by `proma-verify cases`?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{path}: the manifest must be a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: format must be {FORMAT_NAME!r}; got {manifest.get('format')!r}")
    version = manifest.get("schema_version")
    if not is_int(version) or version not in READABLE_VERSIONS:
        raise FormatError(f"{path}: schema_version {version!r} is not supported (this reader knows "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    tol = manifest.get("tolerances")
    if not isinstance(tol, dict) or not all(
            isinstance(tol.get(d), dict) and is_tolerance(tol[d].get("rtol")) and is_tolerance(tol[d].get("atol"))
            for d in ("float64", "float32")):
        raise FormatError(f"{path}: tolerances must give rtol and atol (finite numbers >= 0) for float64 and float32")
    if not isinstance(manifest.get("cases"), list) or not manifest["cases"]:
        raise FormatError(f"{path}: cases must be a non-empty list")
    return manifest


def is_tolerance(x) -> bool:
    """A finite number >= 0 (a pass-test tolerance)."""
    return is_real(x) and x >= 0


def archive_path(cases_dir: Path, file, where: str) -> Path:
    """The manifest's ``file``, which must name a file inside ``cases_dir`` (after resolving ``..`` and
    symlinks): a case directory is judged on its own content only."""
    if not isinstance(file, str) or not file:
        raise FormatError(f"{where}: file must be a file name inside the case directory; got {file!r}")
    root = Path(cases_dir).resolve()
    path = (root / file).resolve()
    if Path(file).is_absolute() or not path.is_relative_to(root):
        raise FormatError(f"{where}: file {file!r} resolves to {path}, outside the case directory {root}")
    if not path.is_file():
        raise FormatError(f"{where}: archive {Path(cases_dir) / file} not found")
    return path


def read_npz(path: Path, what: str) -> dict:
    """``{key: array}`` of an ``.npz`` archive, refusing what it cannot judge by name.

    Raises
    ------
    FormatError naming ``what`` and the file: not an ``.npz`` (a ``.npy`` array, a damaged zip), or an array
    that needs pickle (an object array), named by its key.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile / format errors of a damaged file
        raise FormatError(f"{what} {path}: cannot read as .npz ({type(exc).__name__}: {exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FormatError(f"{what} {path}: is a single .npy array, not an .npz archive of named arrays "
                          f"(write it with numpy.savez)")
    arrays = {}
    with z:
        for key in z.files:
            try:
                arrays[key] = z[key]
            except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
                raise FormatError(f"{what} {path}: array {key!r} cannot be read without pickle (an object "
                                  f"array?); store numbers only ({exc})") from None
            except Exception as exc:
                raise FormatError(f"{what} {path}: array {key!r} cannot be read ({type(exc).__name__}: "
                                  f"{exc})") from None
    return arrays


def _check_declared_size(boundaries, layers: list, n_arrays: int, where: str) -> None:
    """Refuse at once a manifest that declares more microbatches than its archive could hold.

    Every microbatch has at least its weights and one array per use of every layer, so an archive of
    ``n_arrays`` arrays holds at most ``n_arrays // (1 + uses)`` microbatches (before any per-key work).
    """
    if not isinstance(boundaries, list):
        raise FormatError(f"{where}: microbatch_boundaries must be a list; got {type(boundaries).__name__}")
    per_microbatch = 1 + sum(len(layer.uses) for layer in layers)
    if len(boundaries) - 1 > n_arrays // per_microbatch:
        raise FormatError(f"{where}: microbatch_boundaries declares {len(boundaries) - 1} microbatches, but its "
                          f"archive holds only {n_arrays} arrays (at least {per_microbatch} per microbatch)")


def case_from_entry(entry, cases_dir: Path, index: int) -> Case:
    """Case ``index`` of a manifest, its archive read (not yet validated: see :func:`validate_case`)."""
    where = f"{cases_dir / MANIFEST}: cases[{index}]"
    need = {"id", "file", "description", "settings", "layers", "microbatch_boundaries"}
    if not isinstance(entry, dict) or not need <= set(entry):
        raise FormatError(f"{where}: a case needs the keys {sorted(need)}")
    cid = entry["id"]
    if not isinstance(cid, str) or not _CASE_ID.match(cid):
        raise FormatError(f"{where}: id {cid!r} must match {_CASE_ID.pattern}")
    where = f"case {cid!r}"
    if not isinstance(entry["layers"], list):
        raise FormatError(f"{where}: layers must be a list")
    layers = [Layer.from_json(obj, f"{where}: layers[{k}]") for k, obj in enumerate(entry["layers"])]
    path = archive_path(cases_dir, entry["file"], where)
    arrays = read_npz(path, f"{where}: archive")
    _check_declared_size(entry["microbatch_boundaries"], layers, len(arrays), where)
    return Case(id=cid, description=str(entry["description"]),
                settings=Settings.from_json(entry["settings"], where), layers=layers,
                boundaries=entry["microbatch_boundaries"], arrays=arrays, tags=list(entry.get("tags", [])))


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
