"""The golden case set: shipped synthetic cases equal to what the generator makes now, a cached real part,
digests, and the checker's note on directories that differ from the shipped set."""
from __future__ import annotations

import json
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


def _fake_real(seed):
    """A stand-in for verification.realcase.real_cases (no warm-start): one synthetic case tagged real."""
    case = synthetic_cases(seed)[0]
    case.id, case.tags = "fake_real", ["real"]
    return [case]


def test_shipped_cases_are_what_the_generator_makes_now():
    """Fails when the reference or the recipes change without `python -m verification.oracle.golden`."""
    shipped, manifest = load_cases(golden.GOLDEN_DIR)
    fresh = synthetic_cases(golden.GOLDEN_SEED)
    assert [c.id for c in shipped] == [c.id for c in fresh]
    for a, b in zip(shipped, fresh):
        assert a.manifest_entry() == b.manifest_entry()
        assert sorted(a.arrays) == sorted(b.arrays)
        for key in a.arrays:
            np.testing.assert_allclose(a.arrays[key], b.arrays[key], rtol=FLOAT64_RTOL, atol=0, err_msg=f"{a.id} {key}")
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
