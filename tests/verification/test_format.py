"""The case format: round trip, semantics of the stored arrays, and clean errors on malformed input."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verification.oracle.cases import synthetic_cases
from verification.oracle.format import (
    MANIFEST,
    SCHEMA_VERSION,
    FormatError,
    layer_key,
    load_cases,
    save_cases,
    use_key,
    weights_key,
)
from verification.tolerances import FLOAT64_RTOL


def test_round_trip_preserves_every_array(cases_dir):
    loaded, manifest = load_cases(cases_dir)
    fresh = synthetic_cases(0)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert [c.id for c in loaded] == [c.id for c in fresh]
    for a, b in zip(loaded, fresh):
        assert a.settings == b.settings and a.layers == b.layers and a.boundaries == b.boundaries
        assert set(a.arrays) == set(b.arrays)
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=f"{a.id}: {key}")


def test_case_set_covers_the_issue(cases_dir):
    """Single and many microbatches, rank-deficient, zero weights, tied, every solver and variant."""
    cases, _ = load_cases(cases_dir)
    tags = {t for c in cases for t in c.tags}
    assert {"single-microbatch", "many-microbatches", "rank-deficient", "zero-weights", "tied"} <= tags
    seen = {(c.settings.variant, c.settings.solver if c.settings.variant == "proma" else None) for c in cases}
    assert {("none", None), ("proma", "exact"), ("proma", "gram_schmidt"), ("proma", "ridge"),
            ("intra", None)} <= seen
    assert {c.settings.passes for c in cases if c.settings.solver == "gram_schmidt" and c.settings.variant == "proma"} >= {1, 2}
    assert {c.settings.intra_form for c in cases if c.settings.variant == "intra"} == {"two_sided", "kron"}
    assert any(c.settings.relative_bound is not None for c in cases)
    assert any(c.settings.shrinkage != 1.0 for c in cases)


def _brute_force_pg(case, m, k):
    """sum_i w_i g_i by explicit loops over tokens (no reference code): the stored pg must equal it."""
    layer, w = case.layers[k], case.weights(m)
    total = np.zeros(layer.shape)
    for u, kind in enumerate(layer.uses):
        arrays = case.use(m, k, u)
        if kind == "linear":
            for x, d, j in zip(arrays["X"], arrays["D"], arrays["seq"]):
                total += w[j] * np.outer(d, x)
        else:
            for j in range(case.batch_size(m)):
                total += w[j] * arrays["seq_grads"][j]
    return total


def test_stored_pg_and_chaining_match_the_format_definition(cases_dir):
    cases, _ = load_cases(cases_dir)
    for case in cases:
        for m in range(case.n_microbatches):
            for k in range(len(case.layers)):
                pg = _brute_force_pg(case, m, k)
                np.testing.assert_allclose(case.expected(m, k, "pg"), pg, rtol=FLOAT64_RTOL, atol=1e-12,
                                           err_msg=f"{case.id} mb{m} layer{k}")
                G_in = case.expected(m, k, "G_in")
                if m == 0:
                    assert not np.any(G_in)
                else:
                    np.testing.assert_array_equal(G_in, case.expected(m - 1, k, "G_out"))
                if case.settings.variant == "none":
                    np.testing.assert_allclose(case.expected(m, k, "G_out"), G_in + pg, rtol=FLOAT64_RTOL)


def test_zero_weight_microbatch_under_relative_bound_removes_nothing(cases_dir):
    (case,), _ = load_cases(cases_dir, only=["exact_relative_bound_0.5"])
    m = 2  # all weights zero in this microbatch
    assert not np.any(case.weights(m))
    for k in range(len(case.layers)):
        np.testing.assert_array_equal(case.expected(m, k, "G_out"), case.expected(m, k, "G_in"))


def test_exact_projection_is_orthogonal_to_the_microbatch(cases_dir):
    """G_out - pg is orthogonal to every sequence gradient of the microbatch, layer by layer."""
    from verification.oracle.expected import layer_seq_grads

    cases, _ = load_cases(cases_dir)
    for case in (c for c in cases if c.settings.variant == "proma" and c.settings.solver == "exact"
                 and c.settings.relative_bound is None and c.settings.shrinkage == 1.0):
        for m in range(1, case.n_microbatches):
            for k in range(len(case.layers)):
                g = layer_seq_grads(case, m, k).reshape(case.batch_size(m), -1)
                projected = (case.expected(m, k, "G_out") - case.expected(m, k, "pg")).ravel()
                scale = np.linalg.norm(g, axis=1) * np.linalg.norm(case.expected(m, k, "G_in")) + 1e-300
                assert np.all(np.abs(g @ projected) <= 1e-10 * scale), f"{case.id} mb{m} layer{k}"


# ------------------------------------------------------------------------------------------- malformed
@pytest.fixture
def broken_dir(cases_dir, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(cases_dir, target)
    return target


def _rewrite_npz(path, edit):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)


def test_missing_array_names_case_and_array(broken_dir):
    _rewrite_npz(broken_dir / "exact_tied_only.npz", lambda a: a.pop(use_key(1, 0, 0, "X")))
    with pytest.raises(FormatError, match=r"case 'exact_tied_only': missing array 'mb1/layer0/use0/X'"):
        load_cases(broken_dir)


def test_wrong_shape_names_case_and_array(broken_dir):
    def edit(a):
        a[layer_key(0, 1, "G_out")] = np.zeros((7,))
    _rewrite_npz(broken_dir / "ridge_1.npz", edit)
    with pytest.raises(FormatError, match=r"case 'ridge_1': array 'mb0/layer1/G_out' has shape \(7,\); expected \(5\)"):
        load_cases(broken_dir)


def test_bad_weights_and_sequence_index(broken_dir):
    _rewrite_npz(broken_dir / "none_plain.npz", lambda a: a.__setitem__(weights_key(0), np.array([1.0, np.nan, 0.0])))
    with pytest.raises(FormatError, match=r"'none_plain': array 'mb0/weights' contains NaN"):
        load_cases(broken_dir)

    def edit(a):
        a[use_key(0, 0, 0, "seq")] = a[use_key(0, 0, 0, "seq")] + 10
    _rewrite_npz(broken_dir / "none_plain.npz", lambda a: a.__setitem__(weights_key(0), np.ones(3)))
    _rewrite_npz(broken_dir / "none_plain.npz", edit)
    with pytest.raises(FormatError, match=r"'mb0/layer0/use0/seq' holds sequence indices outside 0..2"):
        load_cases(broken_dir)


def test_unknown_array_is_rejected(broken_dir):
    _rewrite_npz(broken_dir / "none_plain.npz", lambda a: a.__setitem__("mb0/layer0/use0/Xt", np.ones(2)))
    with pytest.raises(FormatError, match=r"unknown array 'mb0/layer0/use0/Xt'"):
        load_cases(broken_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__("schema_version", 99), r"schema_version 99 is not supported"),
    (lambda m: m.__setitem__("format", "other"), r"format must be 'proma-verify-cases'"),
    (lambda m: m["cases"][0]["settings"].__setitem__("solver", "qr"), r"case 'none_plain': settings.solver"),
    (lambda m: m["cases"][0]["settings"].pop("ridge"), r"settings keys wrong \(missing \['ridge'\]"),
    (lambda m: m["cases"][0]["layers"][0].__setitem__("shape", [5]), r"linear use must have a 2-D shape"),
    (lambda m: m["cases"][0].__setitem__("microbatch_boundaries", [0, 3, 3, 8, 10]), r"strictly increasing"),
    (lambda m: m["cases"][0].__setitem__("file", "nope.npz"), r"archive .*nope.npz not found"),
])
def test_bad_manifest_fails_cleanly(broken_dir, edit, message):
    path = broken_dir / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=message):
        load_cases(broken_dir)


def test_missing_manifest_and_bad_json(tmp_path):
    with pytest.raises(FormatError, match="no manifest"):
        load_cases(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_cases(tmp_path)


def test_unknown_only_id(cases_dir):
    with pytest.raises(FormatError, match=r"unknown case id\(s\) \['nope'\]"):
        load_cases(cases_dir, only=["nope"])


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1))
def test_generation_is_deterministic_and_valid_for_any_seed(tmp_path_factory, seed):
    """Every seed gives a valid case set (save validates) with the same structure."""
    cases = synthetic_cases(seed)[:4]
    path = tmp_path_factory.mktemp("seeded")
    save_cases(path, cases)
    loaded, _ = load_cases(path)
    assert [c.id for c in loaded] == [c.id for c in cases]
    again = synthetic_cases(seed)[:4]
    for a, b in zip(cases, again):
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def _format_md():
    from pathlib import Path

    import verification

    return (Path(verification.__file__).parent / "FORMAT.md").read_text()


def test_numpy_only_reader_in_format_md_runs(cases_dir, tmp_path):
    from verification.oracle.check import write_candidate
    from verification.oracle.impls import run_reference

    text = _format_md()
    code = text.split("<!-- numpy-reader -->\n```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 30 and "verification" not in code and "torch" not in code
    namespace = {}
    exec(compile(code, "FORMAT.md", "exec"), namespace)
    cases, _ = load_cases(cases_dir, only=["ridge_1", "exact_rank_deficient"])
    outputs = {c.id: run_reference(c) for c in cases}
    n, failures = namespace["check"](cases_dir, write_candidate(tmp_path / "c.npz", outputs))
    assert n == sum(c.n_microbatches * len(c.layers) for c in cases) and failures == []
    outputs["ridge_1"][1][0] = outputs["ridge_1"][1][0] * (1 + 1e-6)
    n, failures = namespace["check"](cases_dir, write_candidate(tmp_path / "bad.npz", outputs))
    assert len(failures) == 1 and failures[0].startswith("ridge_1/mb1/layer0/G_out")


@pytest.mark.parametrize("version, ok", [(1, True), (2, True), (3, False), ("2", False)])
def test_reader_accepts_versions_1_and_2_only(cases_dir, tmp_path, version, ok):
    copy = tmp_path / "cases"
    shutil.copytree(cases_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema_version"] = version
    (copy / MANIFEST).write_text(json.dumps(manifest))
    if ok:
        assert load_cases(copy, only=["ridge_1"])[0][0].id == "ridge_1"
    else:
        with pytest.raises(FormatError, match="schema_version .* is not supported"):
            load_cases(copy, only=["ridge_1"])


def test_default_set_has_stress_and_linear_only_cases_for_every_setting(cases_dir):
    cases, manifest = load_cases(cases_dir)
    assert manifest["schema_version"] == SCHEMA_VERSION == 2
    linear_only = {c.settings for c in cases if all(layer.uses == ("linear",) for layer in c.layers)}
    assert {c.settings for c in cases} <= linear_only
    tags = {t for c in cases for t in c.tags}
    assert {"stress", "scale", "span", "ill-conditioned", "duplicates", "zero-gradient", "b>P", "one-token",
            "long-sequence"} <= tags
    scaled = {(c.settings.variant, c.settings.solver, c.settings.relative_bound is not None)
              for c in cases if "scale" in c.tags}
    for solver in ("exact", "gram_schmidt", "ridge"):
        assert {("proma", solver, False), ("proma", solver, True)} <= scaled
    assert all(c.description and c.tags for c in cases)
