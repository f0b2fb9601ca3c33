"""Compare a candidate implementation's outputs with a case directory's expected arrays.

The pass test (FORMAT.md): per case, microbatch m and layer k, with e the expected ``G_out`` and c the
candidate, ``scale = max(||G_out||, ||G_in||, ||pg||)`` and the case passes iff every
``||c - e|| <= rtol * scale + atol``. Reported per case: the worst ``abs_err = max|c - e|`` and
``rel_err = ||c - e|| / scale`` and where they occurred.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .format import Case, FormatError, candidate_key, load_cases

STATUS_PASS, STATUS_FAIL, STATUS_ERROR = "PASS", "FAIL", "ERROR"


@dataclass
class CaseResult:
    """Outcome of one case: status, worst errors, where, tolerance used, and a message for FAIL/ERROR."""

    case_id: str
    settings: str
    status: str
    max_abs_err: float = float("nan")
    max_rel_err: float = float("nan")
    worst: str = ""
    rtol: float = float("nan")
    atol: float = float("nan")
    dtype: str = ""
    message: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CheckResult:
    """All case results of one check; ``ok`` iff every case passed."""

    results: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status == STATUS_PASS for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 all pass, 1 some case fails, 2 some input malformed."""
        if any(r.status == STATUS_ERROR for r in self.results):
            return 2
        return 0 if self.ok else 1

    def failures(self) -> list:
        return [r for r in self.results if r.status != STATUS_PASS]

    def table(self) -> str:
        """A fixed-width per-case table followed by the messages of failing cases."""
        head = ("case", "settings", "dtype", "max abs err", "max rel err", "rtol", "worst at", "result")
        rows = [head] + [(r.case_id, r.settings, r.dtype, _fmt(r.max_abs_err), _fmt(r.max_rel_err), _fmt(r.rtol),
                          r.worst, r.status) for r in self.results]
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_pass = sum(r.status == STATUS_PASS for r in self.results)
        lines.append(f"{n_pass}/{len(self.results)} cases pass")
        for r in self.failures():
            lines.append(f"{r.status} {r.case_id}: {r.message}")
        for key in self.unexpected_keys[:5]:
            lines.append(f"note: candidate array {key!r} matches no checked case; ignored")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise AssertionError with the table if any case failed (for use inside a test suite)."""
        if not self.ok:
            raise AssertionError("PROMA oracle check failed:\n" + self.table())


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def _tolerance(manifest: dict, dtype, rtol, atol) -> tuple:
    name = np.dtype(dtype).name if dtype is not None else "float64"
    cls = "float64" if name == "float64" else "float32"
    tol = manifest["tolerances"][cls]
    return cls, (tol["rtol"] if rtol is None else rtol), (tol["atol"] if atol is None else atol)


def compare_case(case: Case, outputs, manifest: dict, *, dtype=None, rtol=None, atol=None) -> CaseResult:
    """Compare ``outputs[m][k]`` (running gradient after microbatch m, layer k) with the case.

    ``dtype`` picks the tolerance class; by default the outputs' own floating dtype (float64 -> float64,
    anything else -> float32). A missing, misshapen or non-finite output gives status ERROR.
    """
    label = case.settings.label()

    def error(msg):
        return CaseResult(case.id, label, STATUS_ERROR, message=msg)

    M, L = case.n_microbatches, len(case.layers)
    try:
        n_out = len(outputs)
    except TypeError:
        return error(f"outputs must be a sequence over {M} microbatches; got {type(outputs).__name__}")
    if n_out != M:
        return error(f"expected outputs for {M} microbatches; got {n_out}")
    arrays = {}
    for m in range(M):
        if outputs[m] is None or len(outputs[m]) != L:
            return error(f"microbatch {m}: expected {L} layer arrays; got "
                         f"{'none' if outputs[m] is None else len(outputs[m])}")
        for k in range(L):
            key = candidate_key(case.id, m, k)
            a = outputs[m][k]
            if a is None:
                return error(f"missing array {key!r}")
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.floating):
                return error(f"array {key!r} must be floating point; got {a.dtype}")
            if a.shape != case.layers[k].shape:
                return error(f"array {key!r} has shape {a.shape}; expected {case.layers[k].shape} "
                             f"(layer {case.layers[k].name!r})")
            if not np.all(np.isfinite(a)):
                return error(f"array {key!r} contains NaN or inf")
            arrays[m, k] = a
    if dtype is None:
        dtype = np.result_type(*[a.dtype for a in arrays.values()])
    cls, rtol, atol = _tolerance(manifest, dtype, rtol, atol)
    worst_abs, worst_rel, worst_at, failed = 0.0, 0.0, "", None
    for (m, k), a in arrays.items():
        e = case.expected(m, k, "G_out")
        scale = max(np.linalg.norm(e), np.linalg.norm(case.expected(m, k, "G_in")),
                    np.linalg.norm(case.expected(m, k, "pg")))
        diff = a.astype(np.float64) - e
        dnorm = float(np.linalg.norm(diff))
        abs_err = float(np.max(np.abs(diff))) if diff.size else 0.0
        rel = dnorm / scale if scale > 0 else (0.0 if dnorm == 0 else math.inf)
        worst_abs = max(worst_abs, abs_err)
        if rel > worst_rel or not worst_at:
            worst_rel, worst_at = rel, f"mb{m}/layer{k}"
        if dnorm > rtol * scale + atol and failed is None:
            failed = (f"array {candidate_key(case.id, m, k)!r} (layer {case.layers[k].name!r}) differs: "
                      f"rel err {rel:.3e} > rtol {rtol:.1e} (abs err {abs_err:.3e})")
    return CaseResult(case.id, label, STATUS_FAIL if failed else STATUS_PASS, worst_abs, worst_rel, worst_at,
                      rtol, atol, cls, failed or "")


# ------------------------------------------------------------------------------------------ entry points
def check_callable(cases_dir, fn, *, only=None, dtype=None, rtol=None, atol=None, progress=False) -> CheckResult:
    """Run ``fn`` on every case of ``cases_dir`` and compare its outputs with the expected ones.

    Parameters
    ----------
    cases_dir : path
        A case directory (FORMAT.md).
    fn : callable ``fn(case) -> outputs``
        Receives a :class:`verification.format.Case` (``case.settings``, ``case.layers``,
        ``case.weights(m)``, ``case.use(m, k, u)``) and returns ``outputs[m][k]``: the running gradient
        after microbatch m for layer k, shape ``case.layers[k].shape`` (NumPy or anything ``np.asarray``
        accepts, e.g. CPU torch tensors). An exception raised by ``fn`` makes that case ERROR.
    only : iterable of str, optional
        Case ids to run.
    dtype, rtol, atol : optional
        Tolerance class / overrides (default: from the outputs' dtype and the manifest).

    Returns
    -------
    CheckResult
        ``.ok``, ``.table()``, ``.raise_if_failed()``.
    """
    cases, manifest = load_cases(cases_dir, only=only)
    result = CheckResult()
    iterator = cases
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="cases", unit="case", leave=False)
    for case in iterator:
        try:
            outputs = fn(case)
        except Exception as exc:  # the candidate's failure is a result, not a crash of the checker
            result.results.append(CaseResult(case.id, case.settings.label(), STATUS_ERROR,
                                             message=f"{type(exc).__name__}: {exc}"))
            continue
        result.results.append(compare_case(case, outputs, manifest, dtype=dtype, rtol=rtol, atol=atol))
    return result


def read_candidate(path) -> dict:
    """Load a candidate ``.npz`` into ``{key: array}`` (FORMAT.md, "Candidate file")."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"candidate file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except Exception as exc:
        raise FormatError(f"candidate file {path}: cannot read as .npz ({exc})") from None


def write_candidate(path, outputs_by_case: dict) -> Path:
    """Write ``{case_id: outputs}`` (``outputs[m][k]`` arrays) as a candidate ``.npz``."""
    arrays = {}
    for case_id, outputs in outputs_by_case.items():
        for m, per_layer in enumerate(outputs):
            for k, a in enumerate(per_layer):
                arrays[candidate_key(case_id, m, k)] = np.asarray(a)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def check_candidate(cases_dir, candidate_path, *, only=None, dtype=None, rtol=None, atol=None) -> CheckResult:
    """Compare a candidate file with a case directory (what ``proma-verify check --candidate`` does)."""
    cases, manifest = load_cases(cases_dir, only=only)
    arrays = read_candidate(candidate_path)
    result = CheckResult()
    used = set()
    for case in cases:
        outputs = []
        for m in range(case.n_microbatches):
            row = []
            for k in range(len(case.layers)):
                key = candidate_key(case.id, m, k)
                row.append(arrays.get(key))
                used.add(key)
            outputs.append(row)
        res = compare_case(case, outputs, manifest, dtype=dtype, rtol=rtol, atol=atol)
        if res.status == STATUS_ERROR:
            res.message = f"{Path(candidate_path).name}: {res.message}"
        result.results.append(res)
    known = {e.get("id") for e in manifest["cases"] if isinstance(e, dict)}
    result.unexpected_keys = sorted(key for key in set(arrays) - used if key.split("/", 1)[0] not in known)
    return result
