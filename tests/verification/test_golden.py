"""The golden case set: shipped synthetic cases equal to what the generator makes now, a cached real part,
digests, and the checker's note on directories that differ from the shipped set."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from verification.cli import main
from verification.oracle import golden
from verification.oracle.cases import synthetic_cases
from verification.oracle.format import MANIFEST, load_cases
from verification.tolerances import FLOAT64_RTOL

# "takes seconds": a copy of the shipped and cached cases (about 2 MB of files plus a small real part here)
COPY_SECONDS = 10.0
# "mb{m}/layer{k}/": the arrays of one layer after one microbatch share its scale (verification/FORMAT.md)
LAYER_KEY = re.compile(r"mb\d+/layer\d+/")


def _fake_real(seed):
    """A stand-in for verification.studies.realcase.real_cases (no warm-start): one synthetic case tagged real."""
    case = synthetic_cases(seed)[0]
    case.id, case.tags = "fake_real", ["real"]
    return [case]


def _scale(case, key: str) -> float:
    """FORMAT.md's scale for an array of layer k after microbatch m: max(||G_in||, ||pg||, ||G_out||), or
    the array's own norm where larger (inputs X, D); arrays outside a layer use their own norm.

    An elementwise relative test would fail on a G_out that is exactly 0 in exact arithmetic (a full
    projection), whose float64 entries are rounding noise that differs between BLAS builds.
    """
    own = float(np.linalg.norm(case.arrays[key]))
    match = LAYER_KEY.match(key)
    if match is None:
        return own
    prefix = match.group(0)
    return max([own] + [float(np.linalg.norm(case.arrays[prefix + n])) for n in ("G_in", "pg", "G_out")])


def test_shipped_cases_are_what_the_generator_makes_now():
    """Fails when the reference or the recipes change without `python -m verification.oracle.golden`."""
    shipped, manifest = load_cases(golden.GOLDEN_DIR)
    fresh = synthetic_cases(golden.GOLDEN_SEED)
    assert [c.id for c in shipped] == [c.id for c in fresh]
    for a, b in zip(shipped, fresh):
        assert a.manifest_entry() == b.manifest_entry()
        assert sorted(a.arrays) == sorted(b.arrays)
        for key in a.arrays:
            diff = np.linalg.norm(np.asarray(a.arrays[key], np.float64) - b.arrays[key])
            assert diff <= FLOAT64_RTOL * _scale(a, key), f"{a.id} {key}: ||shipped - fresh|| {diff:.3e}"
    digests = golden.shipped_digests()
    assert {c.id: golden.case_digest(c) for c in shipped}.items() <= digests.items()
    assert manifest["generator"]["digests"] == {c.id: digests[c.id] for c in shipped}
    assert {"qwen3_gsm8k_exact", "qwen3_gsm8k_paper", "qwen3_gsm8k_intra"} <= set(digests)


def test_digest_sees_one_changed_bit_and_ignores_archive_bytes(cases_dir):
    case = load_cases(cases_dir, only=["exact_tied_only"])[0][0]
    before = golden.case_digest(case)
    assert golden.case_digest(load_cases(cases_dir, only=["exact_tied_only"])[0][0]) == before
    key = "mb0/layer0/G_out"
    a = case.arrays[key].copy()
    a.flat[0] = np.nextafter(a.flat[0], np.inf)
    case.arrays[key] = a
    assert golden.case_digest(case) != before


def test_cases_command_copies_then_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(golden.CACHE_ENV, str(tmp_path / "cache"))
    made = []

    def make_real(seed):
        made.append(seed)
        return _fake_real(seed)

    for run in range(2):
        start = time.perf_counter()
        golden.default_cases(tmp_path / f"out{run}", make_real=make_real, log=lambda *a: None)
        assert time.perf_counter() - start < COPY_SECONDS
    assert made == [golden.GOLDEN_SEED]   # generated once, then taken from the cache
    cases, manifest = load_cases(tmp_path / "out1")
    assert [c.id for c in cases][-1] == "fake_real" and len(cases) == len(synthetic_cases(0)) + 1
    assert set(manifest["generator"]["digests"]) == {c.id for c in cases}
    golden.default_cases(tmp_path / "out2", make_real=make_real, regenerate=True, log=lambda *a: None)
    assert made == [0, 0]
    assert (tmp_path / "cache" / golden.set_key(0) / "synthetic" / MANIFEST).is_file()  # --regenerate rebuilt it


def test_no_real_needs_no_generator_and_other_seeds_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(golden.CACHE_ENV, str(tmp_path / "cache"))
    golden.default_cases(tmp_path / "syn", real=False, log=lambda *a: None)
    assert not any("real" in c.tags for c in load_cases(tmp_path / "syn")[0])
    golden.default_cases(tmp_path / "seed3", seed=3, real=False, log=lambda *a: None)
    assert (tmp_path / "cache" / golden.set_key(3) / "synthetic" / MANIFEST).is_file()
    with pytest.raises(ValueError, match="no generator"):
        golden.default_cases(tmp_path / "real", log=lambda *a: None)


def test_check_reports_cases_that_differ_from_the_shipped_set(tmp_path, capsys):
    assert main(["cases", "--out", str(tmp_path / "cases"), "--no-real"]) == 0
    assert main(["check", "--cases", str(tmp_path / "cases"), "--impl", "reference", "--only", "exact_tied_only"]) == 0
    assert "golden set: 1 cases identical to the shipped set" in capsys.readouterr().out
    path = tmp_path / "cases" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["cases"][0]["description"] += " (edited)"
    path.write_text(json.dumps(manifest))
    assert main(["check", "--cases", str(tmp_path / "cases"), "--impl", "reference", "--only", "none_plain"]) == 0
    out = capsys.readouterr().out
    assert "note: 1 of 1 cases differ from the shipped golden set's checksums" in out and "none_plain" in out
