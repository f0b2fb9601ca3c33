"""The checker: candidates that pass, perturbed ones that fail naming the case, malformed ones (exit 2)."""
import numpy as np
import pytest

from verification.oracle.check import check_callable, check_candidate, read_candidate, write_candidate
from verification.cli import main
from verification.oracle.format import candidate_key, load_cases
from verification.oracle.impls import run_reference


@pytest.fixture(scope="module")
def reference_outputs(cases_dir):
    cases, _ = load_cases(cases_dir)
    return {c.id: run_reference(c) for c in cases}


def test_reference_passes_every_case(cases_dir):
    result = check_callable(cases_dir, run_reference)
    assert result.ok, result.table()
    assert result.exit_code == 0
    assert all(r.max_rel_err <= 1e-12 for r in result.results)


def test_candidate_file_round_trip_passes(cases_dir, reference_outputs, tmp_path, capsys):
    path = write_candidate(tmp_path / "cand.npz", reference_outputs)
    assert check_candidate(cases_dir, path).ok
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(path)]) == 0
    out = capsys.readouterr().out
    n = len(load_cases(cases_dir)[0])
    assert f"{n}/{n} cases pass" in out and "max rel err" in out


def test_float32_candidate_is_judged_at_float32_tolerance(cases_dir, reference_outputs, tmp_path):
    as32 = {cid: [[a.astype(np.float32) for a in per] for per in outs] for cid, outs in reference_outputs.items()}
    result = check_candidate(cases_dir, write_candidate(tmp_path / "c32.npz", as32))
    assert result.ok, result.table()
    assert {r.dtype for r in result.results} == {"float32"}
    # the same float32-rounded numbers fail the float64 tolerance
    strict = check_candidate(cases_dir, tmp_path / "c32.npz", dtype="float64")
    assert not strict.ok


def test_perturbation_in_one_layer_fails_naming_that_case(cases_dir, reference_outputs, tmp_path, capsys):
    outputs = {cid: [[a.copy() for a in per] for per in outs] for cid, outs in reference_outputs.items()}
    target, m, k = "exact_rank_deficient", 2, 3
    outputs[target][m][k] *= 1 + 1e-3
    path = write_candidate(tmp_path / "bad.npz", outputs)
    result = check_candidate(cases_dir, path)
    assert [r.case_id for r in result.failures()] == [target]
    bad = result.failures()[0]
    layer = load_cases(cases_dir, only=[target])[0][0].layers[k].name
    assert bad.status == "FAIL" and bad.worst == f"mb{m}/{layer}"
    assert 1e-4 < bad.max_rel_err <= 1e-3 * (1 + 1e-9)
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {target}: array '{target}/mb{m}/layer{k}/G_out'" in out
    n = len(load_cases(cases_dir)[0])
    assert f"{n - 1}/{n} cases pass" in out


def test_missing_candidate_array_is_an_error_naming_case_and_array(cases_dir, reference_outputs, tmp_path, capsys):
    path = write_candidate(tmp_path / "cand.npz", reference_outputs)
    arrays = read_candidate(path)
    del arrays[candidate_key("ridge_1", 1, 4)]
    np.savez(path, **arrays)
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(path)]) == 2
    out = capsys.readouterr().out
    assert "ERROR ridge_1: cand.npz: missing array 'ridge_1/mb1/layer4/G_out'" in out


def test_wrong_shape_and_nan_candidates(cases_dir, reference_outputs, tmp_path):
    path = write_candidate(tmp_path / "cand.npz", reference_outputs)
    arrays = read_candidate(path)
    arrays[candidate_key("none_plain", 0, 0)] = np.zeros((4, 5))
    arrays[candidate_key("ridge_1", 0, 0)] = np.full((5, 4), np.nan)
    np.savez(path, **arrays)
    result = check_candidate(cases_dir, path)
    errors = {r.case_id: r.message for r in result.failures()}
    assert set(errors) == {"none_plain", "ridge_1"} and result.exit_code == 2
    assert "'none_plain/mb0/layer0/G_out' has shape (4, 5); expected (5, 4)" in errors["none_plain"]
    assert "'ridge_1/mb0/layer0/G_out' contains NaN" in errors["ridge_1"]


def test_unreadable_candidate_and_cases_dir_exit_2(cases_dir, tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert main(["check", "--cases", str(cases_dir), "--candidate", str(junk)]) == 2
    assert "cannot read as .npz" in capsys.readouterr().err
    assert main(["check", "--cases", str(tmp_path), "--candidate", str(junk)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_only_subset_and_unexpected_keys(cases_dir, reference_outputs, tmp_path):
    path = write_candidate(tmp_path / "c.npz", {"ridge_1": reference_outputs["ridge_1"],
                                                 "unknown_case": reference_outputs["ridge_1"]})
    result = check_candidate(cases_dir, path, only=["ridge_1"])
    assert result.ok and [r.case_id for r in result.results] == ["ridge_1"]
    assert result.unexpected_keys and all(k.startswith("unknown_case/") for k in result.unexpected_keys)


def test_callable_exceptions_and_bad_outputs_are_case_errors(cases_dir):
    def broken(case):
        if case.id == "ridge_1":
            raise RuntimeError("boom")
        outs = run_reference(case)
        return outs[:-1] if case.id == "none_plain" else outs

    result = check_callable(cases_dir, broken)
    errors = {r.case_id: r.message for r in result.failures()}
    assert errors == {"ridge_1": "RuntimeError: boom", "none_plain": "expected outputs for 4 microbatches; got 3"}
    with pytest.raises(AssertionError, match="PROMA oracle check failed"):
        result.raise_if_failed()


def test_cli_cases_then_check_torch(tmp_path, capsys):
    out = tmp_path / "cases"
    assert main(["cases", "--out", str(out), "--no-real"]) == 0
    assert (out / "manifest.json").is_file() and len(list(out.glob("*.npz"))) == len(load_cases(out)[0])
    assert main(["check", "--cases", str(out), "--impl", "torch", "--only", "exact_tied_only",
                 "--only", "intra_kron_rank1", "--json", str(tmp_path / "r.json")]) == 0
    assert "2/2 cases pass" in capsys.readouterr().out
    assert main(["check", "--cases", str(out)]) == 2
    assert "exactly one of --candidate FILE or --impl NAME" in capsys.readouterr().err
