"""The oracle refuses what it cannot judge (exit status 2, naming the key, file, option or path at fault),
and a failing case leads with its one-line summary."""
import json
import os
import shutil

import numpy as np
import pytest

from verification.cli import main
from verification.oracle.cases import synthetic_cases
from verification.oracle.check import check_callable, check_candidate, write_candidate
from verification.oracle.format import MANIFEST, FormatError, load_cases, read_manifest, save_cases
from verification.oracle.impls import run_reference

CASE_IDS = ("ridge_1", "none_plain")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two cases (saved once) and the reference's outputs for them."""
    path = tmp_path_factory.mktemp("small-cases")
    cases = [c for c in synthetic_cases(0) if c.id in CASE_IDS]
    save_cases(path, cases)
    return path, {c.id: run_reference(c) for c in cases}


@pytest.fixture
def cases_copy(small, tmp_path):
    """A private, writable copy of the small case directory."""
    path = tmp_path / "cases"
    shutil.copytree(small[0], path)
    return path


def _arrays(outputs):
    return {f"{cid}/mb{m}/layer{k}/G_out": np.asarray(a) for cid, outs in outputs.items()
            for m, row in enumerate(outs) for k, a in enumerate(row)}


def _check(cases_dir, candidate, *extra):
    return main(["check", "--cases", str(cases_dir), "--candidate", str(candidate), *extra])


# ---------------------------------------------------------------------------------- keys of a known case
@pytest.mark.parametrize("wrong, right", [
    ("ridge_1/mb0/layer99/G_out", None),                          # a layer the case does not have
    ("ridge_1/mb0/layer0/G_Out", "ridge_1/mb0/layer0/G_out"),     # misspelt array name
    ("ridge_1/mb1/fc1.weight/G_out", "ridge_1/mb1/layer0/G_out"),  # a layer name instead of layer{k}
    ("ridge_1/mb7/layer0/G_out", None),                           # a microbatch beyond the last
])
@pytest.mark.parametrize("allow_missing", [False, True])
def test_a_malformed_key_under_a_known_case_is_an_error_naming_it(small, tmp_path, capsys, wrong, right,
                                                                  allow_missing):
    cases_dir, ref = small
    arrays = _arrays(ref)
    arrays[wrong] = arrays.pop(right) if right else np.zeros(3)
    np.savez(tmp_path / "c.npz", **arrays)
    assert _check(cases_dir, tmp_path / "c.npz", *(["--allow-missing"] if allow_missing else [])) == 2
    out = capsys.readouterr().out
    assert f"ERROR ridge_1: c.npz: unknown array key(s) '{wrong}' under case 'ridge_1'" in out
    assert "2/2 cases pass" not in out
    # keys of a case the manifest does not hold stay a note (a candidate may cover more cases than a directory)
    arrays = _arrays(ref)
    arrays["other_case/mb0/layer0/G_out"] = np.zeros(3)
    np.savez(tmp_path / "d.npz", **arrays)
    assert _check(cases_dir, tmp_path / "d.npz") == 0
    assert "note: candidate array 'other_case/mb0/layer0/G_out' matches no checked case" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "-inf"])
@pytest.mark.parametrize("option", ["--rtol", "--atol"])
def test_a_tolerance_that_is_not_a_finite_number_ge_0_is_refused(small, tmp_path, capsys, option, value):
    cases_dir, ref = small
    path = write_candidate(tmp_path / "c.npz", ref)
    with pytest.raises(SystemExit) as e:
        _check(cases_dir, path, f"{option}={value}")
    assert e.value.code == 2
    assert f"{option}: must be a finite number >= 0, got '{value}'" in capsys.readouterr().err
    name = option[2:]
    with pytest.raises(FormatError, match=f"{name} must be a finite number >= 0; got {value}"):
        check_candidate(cases_dir, path, **{name: float(value)})
    with pytest.raises(FormatError, match=f"{name} must be a finite number >= 0"):
        check_callable(cases_dir, run_reference, **{name: float(value)})


def test_infinite_rtol_does_not_pass_a_candidate_1_5x_off(small, tmp_path):
    cases_dir, ref = small
    path = write_candidate(tmp_path / "c.npz", {cid: [[1.5 * a for a in row] for row in outs]
                                                for cid, outs in ref.items()})
    assert check_candidate(cases_dir, path).exit_code == 1
    with pytest.raises(FormatError):
        check_candidate(cases_dir, path, rtol=float("inf"))


@pytest.mark.parametrize("rtol", [-1e-9, float("inf"), None, "1e-9"])
def test_manifest_tolerances_must_be_finite_numbers_ge_0(cases_copy, rtol):
    manifest = json.loads((cases_copy / MANIFEST).read_text())
    manifest["tolerances"]["float64"]["rtol"] = rtol if rtol is None or isinstance(rtol, str) or np.isfinite(rtol) \
        else "Infinity"
    (cases_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="tolerances must give rtol and atol"):
        read_manifest(cases_copy)


# ------------------------------------------------------------------------------------ files of a manifest
def _point_file(cases_dir, target: str):
    manifest = json.loads((cases_dir / MANIFEST).read_text())
    manifest["cases"][0]["file"] = target
    (cases_dir / MANIFEST).write_text(json.dumps(manifest))
    return manifest["cases"][0]["id"]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_an_archive_outside_the_case_directory_is_refused(cases_copy, capsys, how):
    cid = json.loads((cases_copy / MANIFEST).read_text())["cases"][0]["id"]
    outside = cases_copy.parent / "outside.npz"
    shutil.copy(cases_copy / f"{cid}.npz", outside)
    if how == "dotdot":
        target = "../outside.npz"
    elif how == "absolute":
        target = str(outside)
    else:
        os.symlink(outside, cases_copy / "link.npz")
        target = "link.npz"
    _point_file(cases_copy, target)
    with pytest.raises(FormatError, match=rf"case '{cid}': file '{target}' resolves to .*outside.npz, outside the "
                                          rf"case directory"):
        load_cases(cases_copy)
    assert main(["check", "--cases", str(cases_copy), "--impl", "reference"]) == 2
    assert "outside the case directory" in capsys.readouterr().err
    # a symlink that stays inside the directory is fine
    if how == "symlink":
        os.remove(cases_copy / "link.npz")
        os.symlink(cases_copy / f"{cid}.npz", cases_copy / "link.npz")
        assert len(load_cases(cases_copy)[0]) == len(CASE_IDS)


@pytest.mark.parametrize("version", [0, -1, 3, 2.0, "2", True, None])
def test_unknown_schema_versions_are_refused(cases_copy, version):
    manifest = json.loads((cases_copy / MANIFEST).read_text())
    manifest["schema_version"] = version
    (cases_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=rf"schema_version {version!r} is not supported"):
        read_manifest(cases_copy)


def test_schema_versions_1_and_2_are_read(cases_copy):
    for version in (1, 2):
        manifest = json.loads((cases_copy / MANIFEST).read_text())
        manifest["schema_version"] = version
        (cases_copy / MANIFEST).write_text(json.dumps(manifest))
        assert read_manifest(cases_copy)["schema_version"] == version


# ------------------------------------------------------------------------------------ what a file holds
def test_an_object_array_is_refused_by_name(small, cases_copy, tmp_path, capsys):
    cases_dir, ref = small
    arrays = _arrays(ref)
    arrays["ridge_1/mb0/layer0/G_out"] = np.array([[1.0, "x"]], dtype=object)
    np.savez(tmp_path / "c.npz", **arrays)
    assert _check(cases_dir, tmp_path / "c.npz") == 2
    err = capsys.readouterr().err
    assert "array 'ridge_1/mb0/layer0/G_out' cannot be read without pickle (an object array?)" in err
    # the same in a case archive
    with np.load(cases_copy / "ridge_1.npz") as z:
        case_arrays = dict(z)
    case_arrays["mb0/weights"] = case_arrays["mb0/weights"].astype(object)
    np.savez(cases_copy / "ridge_1.npz", **case_arrays)
    with pytest.raises(FormatError, match=r"case 'ridge_1': archive .*ridge_1.npz: array 'mb0/weights' cannot be "
                                          r"read without pickle"):
        load_cases(cases_copy)


def test_an_npy_file_given_for_an_npz_is_refused(small, tmp_path, capsys):
    cases_dir, ref = small
    np.save(tmp_path / "c.npy", np.zeros(3))
    assert _check(cases_dir, tmp_path / "c.npy") == 2
    err = capsys.readouterr().err
    assert f"candidate file {tmp_path / 'c.npy'}: is a single .npy array, not an .npz archive" in err
    assert "Traceback" not in err and "AttributeError" not in err


# ------------------------------------------------------------------------------------------------ outputs
def test_an_output_that_cannot_be_written_exits_2_naming_it(small, tmp_path, capsys):
    cases_dir, ref = small
    path = write_candidate(tmp_path / "c.npz", ref)
    (tmp_path / "a-file").write_text("")
    bad_json = tmp_path / "a-file" / "r.json"  # under a regular file: no permission trick needed (root too)
    assert _check(cases_dir, path, "--json", str(bad_json)) == 2
    assert f"proma-verify check: error: cannot write {bad_json}" in capsys.readouterr().err
    bad_out = tmp_path / "a-file" / "cases"
    assert main(["cases", "--out", str(bad_out), "--no-real"]) == 2
    assert f"proma-verify cases: error: cannot write {tmp_path / 'a-file'}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- declared sizes
def test_absurd_declared_microbatch_counts_are_refused_before_any_per_key_work(cases_copy):
    manifest = json.loads((cases_copy / MANIFEST).read_text())
    manifest["cases"][0]["microbatch_boundaries"] = list(range(2_000_001))
    (cases_copy / MANIFEST).write_text(json.dumps(manifest))
    cid = manifest["cases"][0]["id"]
    with pytest.raises(FormatError, match=rf"case '{cid}': microbatch_boundaries declares 2000000 microbatches, but "
                                          rf"its archive holds only \d+ arrays"):
        load_cases(cases_copy)


# ----------------------------------------------------------------------------------------- failing cases
def test_a_failing_case_leads_with_its_one_line_summary(small, tmp_path, capsys):
    cases_dir, ref = small
    bad = {cid: [[a if m == 0 else 1.5 * a for a in row] for m, row in enumerate(outs)] for cid, outs in ref.items()}
    path = write_candidate(tmp_path / "c.npz", bad)
    assert _check(cases_dir, path, "--only", "ridge_1") == 1
    lines = capsys.readouterr().out.splitlines()
    fails = [line for line in lines if line.startswith("FAIL ridge_1")]
    n_fail = sum(a is not None for row in ref["ridge_1"][1:] for a in row)
    assert fails[0].startswith(f"FAIL ridge_1: {n_fail}/{n_fail + len(ref['ridge_1'][0])} arrays fail; first "
                               f"failing microbatch mb1 (mb1/")
    assert "; worst mb" in fails[0] and "rel err" in fails[0]
    # then at most a screenful of detail, and where to get the rest
    assert len(fails) <= 7 and fails[-1].endswith("more failing arrays (--verbose lists every one)")
