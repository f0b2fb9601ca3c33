"""Compare a candidate implementation's outputs with a case directory's expected arrays.

The pass test (FORMAT.md, schema version 2): per case, microbatch m and layer k, with e the expected
``G_out`` and c the candidate, ``scale = max(||G_out||, ||G_in||, ||pg||)``; the array passes iff
``||c - e|| <= rtol * scale``, or ``||c - e|| <= atol`` where ``scale`` is 0. Nothing absolute enters a
non-zero scale, so the verdict does not depend on the size of the case's gradients.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .format import Case, FormatError, candidate_key, is_tolerance, load_cases, read_npz
from .verdicts import (
    MODE_CHAIN,
    MODE_STEP,
    STATUS_ERROR,
    STATUS_FAIL,
    STATUS_PASS,
    STATUS_SKIP,
    ArrayResult,
    CaseResult,
    CheckResult,
)

ALLOW_MISSING_HINT = "pass --allow-missing (allow_missing=True) to skip absent arrays"


def tolerance(manifest: dict, dtype, rtol=None, atol=None) -> tuple:
    """``(class, rtol, atol)``: float64 for float64 outputs, float32 for anything else; overrides win."""
    name = np.dtype(dtype).name if dtype is not None else "float64"
    cls = "float64" if name == "float64" else "float32"
    tol = manifest["tolerances"][cls]
    check_overrides(rtol, atol)  # inf would pass anything, NaN or a negative one nothing: refused, not used
    return cls, (tol["rtol"] if rtol is None else rtol), (tol["atol"] if atol is None else atol)


def judge_array(case: Case, m: int, k: int, a: np.ndarray, rtol: float, atol: float) -> ArrayResult:
    """The scale-aware pass test on one well-formed array ``a`` (layer k after microbatch m)."""
    layer = case.layers[k]
    e = case.expected(m, k, "G_out")
    scale = float(max(np.linalg.norm(e), np.linalg.norm(case.expected(m, k, "G_in")),
                      np.linalg.norm(case.expected(m, k, "pg"))))
    diff = a.astype(np.float64) - e
    dnorm = float(np.linalg.norm(diff))
    abs_err = float(np.max(np.abs(diff))) if diff.size else 0.0
    rel = dnorm / scale if scale > 0 else (0.0 if dnorm == 0 else math.inf)
    ok = dnorm <= rtol * scale if scale > 0 else dnorm <= atol
    key = candidate_key(case.id, m, k)
    if ok:
        message = ""
    elif scale > 0:
        message = (f"array {key!r} (layer {layer.name!r}) differs: rel err {rel:.3e} > rtol {rtol:.1e} "
                   f"(abs err {abs_err:.3e}, scale {scale:.3e})")
    else:
        message = f"array {key!r} (layer {layer.name!r}) differs: expected zeros, ||c|| {dnorm:.3e} > atol {atol:.1e}"
    return ArrayResult(m, k, layer.name, key, STATUS_PASS if ok else STATUS_FAIL, rel, abs_err, scale, message)


def _malformed(case: Case, m: int, k: int, a: np.ndarray) -> str:
    """Why ``a`` cannot be judged (not floating, wrong shape, non-finite), or "" when it can."""
    key, layer = candidate_key(case.id, m, k), case.layers[k]
    if not np.issubdtype(a.dtype, np.floating):
        return f"array {key!r} must be floating point; got {a.dtype}"
    if a.shape != layer.shape:
        return f"array {key!r} has shape {a.shape}; expected {layer.shape} (layer {layer.name!r})"
    if not np.all(np.isfinite(a)):
        return f"array {key!r} contains NaN or inf"
    return ""


def _case_status(arrays: list) -> str:
    statuses = {a.status for a in arrays}
    for status in (STATUS_ERROR, STATUS_FAIL, STATUS_PASS):
        if status in statuses:
            return status
    return STATUS_SKIP


def compare_case(case: Case, outputs, manifest: dict, *, dtype=None, rtol=None, atol=None,
                 allow_missing=False) -> CaseResult:
    """Compare ``outputs[m][k]`` (running gradient after microbatch m, layer k) with the case.

    ``outputs[m][k] is None`` (or ``outputs[m] is None``) marks an absent array: SKIP with
    ``allow_missing``, else ERROR naming it. ``dtype`` picks the tolerance class; by default the outputs'
    own floating dtype (float64 -> float64, anything else -> float32). Misshapen or non-finite arrays are
    ERROR; every array is judged and reported, not only the first bad one.
    """
    label = case.settings.label()
    M, L = case.n_microbatches, len(case.layers)

    def error(msg):
        return CaseResult(case.id, label, STATUS_ERROR, message=msg, description=case.description)

    try:
        n_out = len(outputs)
    except TypeError:
        return error(f"outputs must be a sequence over {M} microbatches; got {type(outputs).__name__}")
    if n_out != M:
        return error(f"expected outputs for {M} microbatches; got {n_out}")
    present, records = {}, {}
    for m in range(M):
        row = outputs[m] if outputs[m] is not None else [None] * L
        if len(row) != L:
            return error(f"microbatch {m}: expected {L} layer arrays; got {len(row)}")
        for k in range(L):
            key, name = candidate_key(case.id, m, k), case.layers[k].name
            if row[k] is None:
                records[m, k] = ArrayResult(m, k, name, key, STATUS_SKIP if allow_missing else STATUS_ERROR)
                continue
            a = np.asarray(row[k])
            why = _malformed(case, m, k, a)
            if why:
                records[m, k] = ArrayResult(m, k, name, key, STATUS_ERROR, message=why)
            else:
                present[m, k] = a
    if dtype is None:
        dtype = np.result_type(*[a.dtype for a in present.values()]) if present else np.float64
    cls, rtol, atol = tolerance(manifest, dtype, rtol, atol)
    for (m, k), a in present.items():
        records[m, k] = judge_array(case, m, k, a, rtol, atol)
    arrays = [records[m, k] for m in range(M) for k in range(L)]
    missing = [a.key for a in arrays if a.status == STATUS_ERROR and not a.message]
    problems = [a.message for a in arrays if a.status == STATUS_ERROR and a.message]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.insert(0, f"missing array {missing[0]!r}{more}; {ALLOW_MISSING_HINT}")
    message = "; ".join(problems)
    return CaseResult(case.id, label, _case_status(arrays), arrays, rtol, atol, cls, message, case.description)


def _skips_in_candidate_dtype(result: CheckResult, manifest: dict, dtype, rtol, atol) -> None:
    """Give cases with no array checked (SKIP) the tolerance class of the arrays the candidate did provide.

    A skipped case has no array of its own to take a dtype from; without this its row would show float64
    tolerances next to a float32 candidate's. The class is ``dtype`` when given, else the widest class among
    the judged cases (float32 if any judged case is float32, which is what the candidate holds).
    """
    if dtype is None:
        judged = {r.dtype for r in result.results if r.checked()}
        if not judged:
            return
        dtype = "float32" if "float32" in judged else "float64"
    cls, rtol, atol = tolerance(manifest, dtype, rtol, atol)
    for r in result.results:
        if r.status == STATUS_SKIP:
            r.dtype, r.rtol, r.atol = cls, rtol, atol


# ------------------------------------------------------------------------------------------ entry points
def stored_inputs(case: Case, m: int) -> list:
    """The stored running gradient entering microbatch m, one array per layer (step mode's start)."""
    return [case.expected(m, k, "G_in").copy() for k in range(len(case.layers))]


def _run_steps(case: Case, step_fn) -> list:
    return [step_fn(case, m, stored_inputs(case, m)) for m in range(case.n_microbatches)]


def check_callable(cases_dir, fn, *, only=None, dtype=None, rtol=None, atol=None, allow_missing=False,
                   step=False, progress=False) -> CheckResult:
    """Run ``fn`` on every case of ``cases_dir`` and compare its outputs with the expected ones.

    Parameters
    ----------
    cases_dir : path
        A case directory (FORMAT.md).
    fn : callable
        Chain mode (default): ``fn(case) -> outputs`` with ``outputs[m][k]`` the running gradient after
        microbatch m for layer k, shape ``case.layers[k].shape`` (NumPy or anything ``np.asarray``
        accepts, e.g. CPU torch tensors; ``None`` for a layer it does not handle). Step mode
        (``step=True``): ``fn(case, m, G_in) -> per_layer``, one microbatch from the stored running
        gradient ``G_in`` (a list of per-layer arrays), so an error in microbatch m is reported at m
        and not carried into later microbatches. An exception raised by ``fn`` makes that case ERROR.
    only : iterable of str, optional
        Case ids to run.
    dtype, rtol, atol : optional
        Tolerance class / overrides (default: from the outputs' dtype and the manifest).
    allow_missing : bool
        Absent arrays (``None``) are skipped and counted instead of being errors.

    Returns
    -------
    CheckResult
        ``.ok``, ``.exit_code``, ``.table()``, ``.to_json()``, ``.raise_if_failed()``.
    """
    check_overrides(rtol, atol)
    cases, manifest = load_cases(cases_dir, only=only)
    result = CheckResult(mode=MODE_STEP if step else MODE_CHAIN, allow_missing=allow_missing)
    iterator = cases
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the base install (NumPy/SciPy only) has no tqdm: no progress bar
            tqdm = None
        if tqdm is not None:
            iterator = tqdm(cases, desc="cases", unit="case", leave=False)
    for case in iterator:
        try:
            outputs = _run_steps(case, fn) if step else fn(case)
        except Exception as exc:  # the candidate's failure is a result, not a crash of the checker
            result.results.append(CaseResult(case.id, case.settings.label(), STATUS_ERROR,
                                             message=f"{type(exc).__name__}: {exc}", description=case.description))
            continue
        result.results.append(compare_case(case, outputs, manifest, dtype=dtype, rtol=rtol, atol=atol,
                                           allow_missing=allow_missing))
    _skips_in_candidate_dtype(result, manifest, dtype, rtol, atol)
    return result


def check_outputs(case: Case, outputs, tolerances: dict, *, dtype=None, allow_missing=False,
                  step=False) -> CheckResult:
    """Judge one loaded case's ``outputs[m][k]`` (the pytest plugin's assertion uses this).

    ``tolerances`` is the manifest's ``{"float64": {"rtol", "atol"}, "float32": {...}}``.
    """
    result = CheckResult(mode=MODE_STEP if step else MODE_CHAIN, allow_missing=allow_missing)
    result.results.append(compare_case(case, outputs, {"tolerances": tolerances}, dtype=dtype,
                                       allow_missing=allow_missing))
    return result


def read_candidate(path) -> dict:
    """Load a candidate ``.npz`` into ``{key: array}`` (FORMAT.md, "Candidate file")."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"candidate file {path} not found")
    return read_npz(path, "candidate file")


def write_candidate(path, outputs_by_case: dict) -> Path:
    """Write ``{case_id: outputs}`` (``outputs[m][k]`` arrays; ``None`` entries are left out) as a candidate."""
    arrays = {}
    for case_id, outputs in outputs_by_case.items():
        for m, per_layer in enumerate(outputs):
            for k, a in enumerate(per_layer or ()):
                if a is not None:
                    arrays[candidate_key(case_id, m, k)] = np.asarray(a)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# a case's stray keys named in its message before "(and N more)"
STRAY_KEYS_SHOWN = 3


def _refuse_stray_keys(res: CaseResult, case: Case, stray: list) -> None:
    """A candidate key under this case that names no array of it (``layer99``, ``G_Out``, a layer name for
    ``layer{k}``, an ``mb`` beyond the last) is an ERROR naming it: it would otherwise be dropped silently, and
    with ``allow_missing`` the array it meant would be skipped as absent."""
    if not stray:
        return
    shown = ", ".join(repr(k) for k in stray[:STRAY_KEYS_SHOWN])
    more = f" (and {len(stray) - STRAY_KEYS_SHOWN} more)" if len(stray) > STRAY_KEYS_SHOWN else ""
    why = (f"unknown array key(s) {shown}{more} under case {case.id!r}: its keys are "
           f"{case.id}/mb{{m}}/layer{{k}}/G_out with m < {case.n_microbatches}, k < {len(case.layers)}")
    res.status = STATUS_ERROR
    res.message = f"{why}; {res.message}" if res.message else why


def check_overrides(rtol, atol) -> None:
    """FormatError unless each given tolerance override is a finite number >= 0 (inf would pass anything)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not is_tolerance(value):
            raise FormatError(f"{name} must be a finite number >= 0; got {value!r}")


def check_candidate(cases_dir, candidate_path, *, only=None, dtype=None, rtol=None, atol=None,
                    allow_missing=False, step=False) -> CheckResult:
    """Compare a candidate file with a case directory (what ``proma-verify check --candidate`` does).

    ``step=True`` declares that the candidate computed every microbatch from the stored ``G_in`` (the
    verdicts are the same arrays; the report then does not attribute later failures to earlier ones).
    """
    check_overrides(rtol, atol)
    cases, manifest = load_cases(cases_dir, only=only)
    arrays = read_candidate(candidate_path)
    result = CheckResult(mode=MODE_STEP if step else MODE_CHAIN, allow_missing=allow_missing)
    used = set()
    name = Path(candidate_path).name
    for case in cases:
        outputs = [[arrays.get(candidate_key(case.id, m, k)) for k in range(len(case.layers))]
                   for m in range(case.n_microbatches)]
        case_keys = {candidate_key(case.id, m, k) for m in range(case.n_microbatches) for k in range(len(case.layers))}
        used |= case_keys
        res = compare_case(case, outputs, manifest, dtype=dtype, rtol=rtol, atol=atol, allow_missing=allow_missing)
        _refuse_stray_keys(res, case, sorted(k for k in arrays if k.split("/", 1)[0] == case.id and k not in case_keys))
        if res.message:
            res.message = f"{name}: {res.message}"
        result.results.append(res)
    _skips_in_candidate_dtype(result, manifest, dtype, rtol, atol)
    known = {e.get("id") for e in manifest["cases"] if isinstance(e, dict)}
    result.unexpected_keys = sorted(key for key in set(arrays) - used if key.split("/", 1)[0] not in known)
    return result
