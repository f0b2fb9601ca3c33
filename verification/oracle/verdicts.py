"""Verdict records of an oracle check: one per array, per case and per check; their tables and JSON.

An *array* is one (case, microbatch m, layer k) running gradient ``G_out``. Layer-wise PROMA treats every
parameter tensor as its own block (the projection of one layer never reads another layer's gradients), so
a per-layer verdict is sound: a candidate that covers only some layers is judged exactly on those.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

STATUS_PASS, STATUS_FAIL, STATUS_ERROR, STATUS_SKIP = "PASS", "FAIL", "ERROR", "SKIP"
JSON_FORMAT = "proma-verify-check"
JSON_VERSION = 1
MODE_CHAIN, MODE_STEP = "chain", "step"
# After a chain-mode FAIL: how to see each microbatch judged on its own. Rerunning the same candidate with
# --step changes nothing; the candidate itself must be recomputed from the stored running gradients.
STEP_HINT = ("To judge each microbatch on its own, recompute the candidate so that every microbatch m starts "
             "from the stored mb{m}/layer{k}/G_in (not from your own G_out of mb{m-1}), then check it with --step "
             "(with --impl: --step runs it so)")
# failing arrays listed per case after its summary line (all of them with verbose)
FAIL_LINES_SHOWN = 5
# a case's table shows this many skipped layer names before "..."
SKIPPED_NAMES_SHOWN = 6


@dataclass
class ArrayResult:
    """The verdict on one array: ``rel_err = ||c - e|| / scale``, ``abs_err = max |c - e|``."""

    m: int
    k: int
    layer: str
    key: str
    status: str
    rel_err: float = float("nan")
    abs_err: float = float("nan")
    scale: float = float("nan")
    message: str = ""

    @property
    def where(self) -> str:
        """``mb{m}/{layer name}``, e.g. ``mb2/fc1.weight``."""
        return f"mb{self.m}/{self.layer}"


@dataclass
class CaseResult:
    """Outcome of one case: its arrays' verdicts, worst errors and where, the tolerance used.

    ``status``: ERROR if an array is malformed (or the implementation raised), else FAIL if a checked
    array fails, else SKIP if no array was checked (all absent, with ``allow_missing``), else PASS.
    """

    case_id: str
    settings: str
    status: str
    arrays: list = field(default_factory=list)
    rtol: float = float("nan")
    atol: float = float("nan")
    dtype: str = ""
    message: str = ""
    description: str = ""

    def checked(self) -> list:
        return [a for a in self.arrays if a.status in (STATUS_PASS, STATUS_FAIL)]

    def skipped(self) -> list:
        return [a for a in self.arrays if a.status == STATUS_SKIP]

    def failing(self) -> list:
        return [a for a in self.arrays if a.status in (STATUS_FAIL, STATUS_ERROR)]

    @property
    def max_abs_err(self) -> float:
        return max((a.abs_err for a in self.checked()), default=float("nan"))

    @property
    def max_rel_err(self) -> float:
        return max((a.rel_err for a in self.checked()), default=float("nan"))

    @property
    def worst(self) -> str:
        """Where the largest relative error occurred: ``mb{m}/{layer name}``."""
        checked = self.checked()
        return max(checked, key=lambda a: a.rel_err).where if checked else ""

    def coverage(self) -> str:
        """``"7/24 arrays checked; skipped: norm.weight, fc1.bias (mb1)"`` (names every skipped layer)."""
        n_mb = len({a.m for a in self.arrays})
        by_layer = {}
        for a in self.skipped():
            by_layer.setdefault(a.layer, []).append(a.m)
        names = [name if len(ms) == n_mb else f"{name} (" + ", ".join(f"mb{m}" for m in ms) + ")"
                 for name, ms in by_layer.items()]
        text = f"{len(self.checked())}/{len(self.arrays)} arrays checked"
        if names:
            shown = names[:SKIPPED_NAMES_SHOWN] + (["..."] if len(names) > SKIPPED_NAMES_SHOWN else [])
            text += "; skipped: " + ", ".join(shown)
        return text

    def to_json(self) -> dict:
        out = {"case_id": self.case_id, "settings": self.settings, "status": self.status, "dtype": self.dtype,
               "rtol": self.rtol, "atol": self.atol, "max_abs_err": self.max_abs_err,
               "max_rel_err": self.max_rel_err, "worst": self.worst, "message": self.message,
               "description": self.description,
               "n_checked": len(self.checked()), "n_skipped": len(self.skipped()), "n_arrays": len(self.arrays),
               "arrays": [asdict(a) for a in self.arrays]}
        return _json_safe(out)


def _json_safe(obj):
    """NaN / inf (no error to report) become null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def _grid(rows: list) -> list:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


@dataclass
class CheckResult:
    """All case results of one check.

    ``ok`` iff at least one array was checked and every checked array passed, with no malformed input;
    ``exit_code``: 0 ok, 1 some checked array fails or nothing was checked, 2 some input malformed.
    """

    results: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)
    mode: str = MODE_CHAIN
    allow_missing: bool = False

    def n_checked(self) -> int:
        return sum(len(r.checked()) for r in self.results)

    @property
    def ok(self) -> bool:
        return self.n_checked() > 0 and all(r.status in (STATUS_PASS, STATUS_SKIP) for r in self.results)

    @property
    def exit_code(self) -> int:
        if any(r.status == STATUS_ERROR for r in self.results):
            return 2
        return 0 if self.ok else 1

    def failures(self) -> list:
        return [r for r in self.results if r.status in (STATUS_FAIL, STATUS_ERROR)]

    def table(self, *, verbose: bool = False) -> str:
        """Per-case table, the per-layer table (``verbose``), every failing array, skips and errors."""
        head = ("case", "settings", "dtype", "checked", "max abs err", "max rel err", "rtol", "worst at", "result")
        rows = [head] + [(r.case_id, r.settings, r.dtype, f"{len(r.checked())}/{len(r.arrays)}",
                          _fmt(r.max_abs_err), _fmt(r.max_rel_err), _fmt(r.rtol), r.worst, r.status)
                         for r in self.results]
        lines = _grid(rows)
        if verbose:
            lines.append("")
            lines += self.layer_table()
        judged = [r for r in self.results if r.status != STATUS_SKIP]
        n_pass = sum(r.status == STATUS_PASS for r in judged)
        summary = f"{n_pass}/{len(judged)} cases pass"
        n_skip_cases = len(self.results) - len(judged)
        if self.allow_missing:
            total = sum(len(r.arrays) for r in self.results)
            summary += f"; {self.n_checked()}/{total} arrays checked, {n_skip_cases} cases skipped (no arrays)"
        if self.mode == MODE_STEP:
            summary += " (step mode: each microbatch from the stored G_in)"
        lines.append(summary)
        if self.n_checked() == 0:
            lines.append("nothing was checked: the candidate holds no array of the selected cases")
        for r in self.results:
            lines += self._case_notes(r, verbose)
        for key in self.unexpected_keys[:5]:
            lines.append(f"note: candidate array {key!r} matches no checked case; ignored")
        return "\n".join(lines)

    def _case_notes(self, r: CaseResult, verbose: bool = False) -> list:
        lines = []
        if r.status == STATUS_ERROR and r.message:
            lines.append(f"ERROR {r.case_id}: {r.message}")
        fails = sorted((a for a in r.failing() if a.status == STATUS_FAIL), key=lambda a: (a.m, a.k))
        if fails:
            # the one line to read first; one bug can fail every later array of the case
            worst = max(fails, key=lambda a: a.rel_err)
            lines.append(f"FAIL {r.case_id}: {len(fails)}/{len(r.arrays)} arrays fail; first failing microbatch "
                         f"mb{fails[0].m} ({fails[0].where}); worst {worst.where}, rel err {worst.rel_err:.3e} "
                         f"(rtol {r.rtol:.1e})")
            shown = fails if verbose else fails[:FAIL_LINES_SHOWN]
            for a in shown:
                lines.append(f"{a.status} {r.case_id}: {a.message}")
            if len(shown) < len(fails):
                lines.append(f"FAIL {r.case_id}: ... and {len(fails) - len(shown)} more failing arrays "
                             "(--verbose lists every one)")
        if r.status in (STATUS_FAIL, STATUS_ERROR) and r.description:
            lines.append(f"  {r.case_id} is: {r.description}")
        if r.status == STATUS_FAIL and self.mode == MODE_CHAIN:
            first = min(a.m for a in r.failing())
            lines.append(f"  {r.case_id}: first failing microbatch mb{first}; later microbatches carry its error "
                         "forward. " + STEP_HINT)
        if r.skipped():
            lines.append(f"SKIP {r.case_id}: {r.coverage()}")
        return lines

    def layer_table(self) -> list:
        """One row per array: case, microbatch, layer name, rel err, abs err, scale, result."""
        head = ("case", "mb", "layer", "rel err", "abs err", "scale", "result")
        rows = [head] + [(r.case_id, str(a.m), a.layer, _fmt(a.rel_err), _fmt(a.abs_err), _fmt(a.scale), a.status)
                         for r in self.results for a in r.arrays]
        return _grid(rows)

    def to_json(self) -> dict:
        """The ``--json`` document (FORMAT.md, "Check results as JSON")."""
        return {"format": JSON_FORMAT, "version": JSON_VERSION, "mode": self.mode,
                "allow_missing": self.allow_missing, "exit_code": self.exit_code,
                "n_checked": self.n_checked(), "cases": [r.to_json() for r in self.results],
                "unexpected_keys": list(self.unexpected_keys)}

    def raise_if_failed(self) -> None:
        """Raise AssertionError with the table if the check is not ``ok`` (for use inside a test suite)."""
        if not self.ok:
            raise AssertionError("PROMA oracle check failed:\n" + self.table())
