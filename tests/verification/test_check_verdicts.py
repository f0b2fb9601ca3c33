"""The checker's verdicts: every position, the tolerance boundary, scale-awareness, skips, step mode, JSON."""
import json

import numpy as np
import pytest

from verification.oracle.check import check_callable, check_candidate, compare_case, write_candidate
from verification.cli import main
from verification.oracle.format import load_cases
from verification.oracle.impls import run_reference, run_reference_step

# perturbations at these multiples of rtol (relative to the array's scale) must fail / pass
OVER_TOLERANCE, UNDER_TOLERANCE = 2.0, 0.5


@pytest.fixture(scope="module")
def loaded(cases_dir):
    cases, manifest = load_cases(cases_dir)
    return cases, manifest, {c.id: run_reference(c) for c in cases}


def _nudged(outputs, m, k, amount, rng):
    out = [[a.copy() for a in row] for row in outputs]
    d = rng.standard_normal(out[m][k].shape)
    out[m][k] = out[m][k] + amount * d / np.linalg.norm(d)
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_position_fails_over_and_passes_under_the_tolerance(loaded, dtype):
    cases, manifest, ref = loaded
    rtol = manifest["tolerances"][dtype]["rtol"]
    rng = np.random.default_rng(0)
    for case in cases:
        base = compare_case(case, ref[case.id], manifest, dtype=dtype)
        assert base.status == "PASS"
        for a in base.arrays:
            over = compare_case(case, _nudged(ref[case.id], a.m, a.k, OVER_TOLERANCE * rtol * a.scale, rng),
                                manifest, dtype=dtype)
            bad = [(r.m, r.k) for r in over.arrays if r.status == "FAIL"]
            assert bad == [(a.m, a.k)], (case.id, a.where, bad)
            under = compare_case(case, _nudged(ref[case.id], a.m, a.k, UNDER_TOLERANCE * rtol * a.scale, rng),
                                 manifest, dtype=dtype)
            assert under.status == "PASS", (case.id, a.where)


def test_verdict_does_not_depend_on_the_gradient_scale(loaded):
    """A 45% error on a case whose gradients are 2^-30 small fails, as it does at scale 1."""
    cases, manifest, ref = loaded
    for cid in ("stress_scale_2pow-30_exact", "stress_scale_2pow30_exact"):
        case = next(c for c in cases if c.id == cid)
        wrong = [[a * 1.45 for a in row] for row in ref[cid]]
        res = compare_case(case, wrong, manifest)
        assert res.status == "FAIL" and all(a.status == "FAIL" for a in res.arrays if a.scale > 0)
        assert res.max_rel_err > 0.1


def test_allow_missing_counts_and_names_skips(cases_dir, loaded, tmp_path, capsys):
    cases, _, ref = loaded
    partial = {"exact_rank_deficient": [[a if k == 0 else None for k, a in enumerate(row)]
                                        for row in ref["exact_rank_deficient"]]}
    path = write_candidate(tmp_path / "partial.npz", partial)
    res = check_candidate(cases_dir, path, allow_missing=True)
    assert res.ok and res.exit_code == 0
    case = next(r for r in res.results if r.case_id == "exact_rank_deficient")
    assert case.status == "PASS" and len(case.checked()) == 4 and len(case.arrays) == 24
    assert case.coverage().startswith("4/24 arrays checked; skipped: fc1.bias, norm.weight")
    assert sum(r.status == "SKIP" for r in res.results) == len(cases) - 1
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(path), "--allow-missing"]) == 0
    assert "SKIP exact_rank_deficient: 4/24 arrays checked; skipped: fc1.bias" in capsys.readouterr().out
    # without the flag: an error naming the array and suggesting the flag
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(path)]) == 2
    assert "missing array 'exact_rank_deficient/mb0/layer1/G_out' (and 19 more); pass --allow-missing" \
        in capsys.readouterr().out
    # nothing checked is not a pass
    empty = write_candidate(tmp_path / "empty.npz", {})
    assert check_candidate(cases_dir, empty, allow_missing=True, only=["ridge_1"]).exit_code == 1
    # a failing checked array still fails with the flag
    bad = {"ridge_1": _nudged(ref["ridge_1"], 1, 0, 1.0, np.random.default_rng(1))}
    assert check_candidate(cases_dir, write_candidate(tmp_path / "b.npz", bad), allow_missing=True,
                           only=["ridge_1"]).exit_code == 1


def test_every_failing_array_is_reported_and_json_is_per_layer(cases_dir, loaded, tmp_path, capsys):
    _, _, ref = loaded
    outputs = dict(ref)
    outputs["ridge_1"] = [[a * 1.01 for a in row] for row in ref["ridge_1"]]
    path = write_candidate(tmp_path / "c.npz", outputs)
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(path), "--verbose",
                 "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    n_arrays = sum(len(row) for row in ref["ridge_1"])
    assert out.count("FAIL ridge_1: array 'ridge_1/") == n_arrays
    assert "first failing microbatch mb0" in out and "scale" in out.splitlines()[len(outputs) + 3]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["format"] == "proma-verify-check" and doc["exit_code"] == 1
    ridge = next(c for c in doc["cases"] if c["case_id"] == "ridge_1")
    assert len(ridge["arrays"]) == n_arrays and all(a["status"] == "FAIL" for a in ridge["arrays"])
    assert {"m", "k", "layer", "rel_err", "abs_err", "scale"} <= set(ridge["arrays"][0])


def test_step_mode_reports_an_error_where_it_is_made(cases_dir):
    def wrong_first(case, m, G_in):
        out = run_reference_step(case, m, G_in)
        return [a * 1.01 for a in out] if m == 0 else out

    chain = check_callable(cases_dir, lambda c: [[a * 1.01 for a in row] if m == 0 else row
                                                 for m, row in enumerate(run_reference(c))], only=["ridge_1"])
    step = check_callable(cases_dir, wrong_first, step=True, only=["ridge_1"])
    assert {a.m for a in step.results[0].failing()} == {0}
    assert {a.m for a in chain.results[0].failing()} == {0}
    assert check_callable(cases_dir, run_reference_step, step=True).ok


def test_fail_lines_are_followed_by_the_case_description(cases_dir, loaded, tmp_path):
    cases, _, ref = loaded
    ridge = next(c for c in cases if c.id == "ridge_1")
    path = write_candidate(tmp_path / "c.npz", {"ridge_1": [[a * 1.01 for a in row] for row in ref["ridge_1"]]})
    res = check_candidate(cases_dir, path, only=["ridge_1"])
    lines = res.table().splitlines()
    last_fail = max(i for i, line in enumerate(lines) if line.startswith("FAIL ridge_1"))
    assert lines[last_fail + 1] == f"  ridge_1 is: {ridge.description}"
    assert res.to_json()["cases"][0]["description"] == ridge.description
    # the chain-mode hint says to recompute from G_in, not merely to rerun with --step
    assert "recompute the candidate so that every microbatch m starts from the stored" in lines[last_fail + 2]


def test_skipped_cases_show_the_candidates_tolerance_class(cases_dir, loaded, tmp_path):
    """A float32 candidate covering one case: every skipped case's row shows float32 and its rtol."""
    cases, manifest, ref = loaded
    one = {"ridge_1": [[a.astype(np.float32) for a in row] for row in ref["ridge_1"]]}
    res = check_candidate(cases_dir, write_candidate(tmp_path / "f32.npz", one), allow_missing=True)
    skipped = [r for r in res.results if r.status == "SKIP"]
    assert len(skipped) == len(cases) - 1
    f32 = manifest["tolerances"]["float32"]
    assert {(r.dtype, r.rtol, r.atol) for r in skipped} == {("float32", f32["rtol"], f32["atol"])}
    calls = check_callable(cases_dir, lambda c: one.get(c.id, [None] * c.n_microbatches), allow_missing=True)
    assert {r.dtype for r in calls.results} == {"float32"}
    # an explicit --dtype wins
    forced = check_candidate(cases_dir, tmp_path / "f32.npz", allow_missing=True, dtype="float64", only=["none_plain"])
    assert forced.results[0].dtype == "float64"
