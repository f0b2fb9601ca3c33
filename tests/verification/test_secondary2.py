"""verification.studies.secondary2 (PREREGISTRATION-2.md section 7): synthetic runs with known answers, checked
against scipy's own t-test and interval, not against the module's helpers."""
import json
import math

import numpy as np
import pytest
import scipy.stats as sps

from verification.studies import secondary2 as S2
from verification.studies import tables
from verification.tolerances import FLOAT64_RTOL


def _run(kl, gain=0.0, entropy=0.6, oos=None, **extra):
    return {"local_kl_mean": kl, "oos_kl_mean": kl if oos is None else oos, "reward_gain": gain,
            "entropy_end_ratio": entropy, **extra}


def test_a_paired_ratio_is_the_geometric_mean_of_per_seed_ratios_with_scipys_t_test():
    ratios = np.array([0.5, 0.6, 0.45, 0.55])
    runs = {}
    for s, r in enumerate(ratios):
        runs[("grpo", 1e-4, s)] = _run(1e-3 * (s + 1))
        runs[("proma", 1e-4, s)] = _run(1e-3 * (s + 1) * r)
    c = S2.paired(runs, "proma", "grpo", "local_kl_mean", 1e-4, "ratio")
    logs = np.log(ratios)
    lo, hi = sps.t.interval(0.95, logs.size - 1, loc=logs.mean(), scale=sps.sem(logs))
    np.testing.assert_allclose([c.interval["mean"], c.interval["lo"], c.interval["hi"]],
                               np.exp([logs.mean(), lo, hi]), rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(c.p, sps.ttest_1samp(logs, 0.0).pvalue, rtol=FLOAT64_RTOL)
    assert c.interval["n"] == 4 and c.kind == "ratio"


def test_a_paired_difference_uses_only_the_seeds_both_methods_ran():
    runs = {("grpo", 1e-4, s): _run(1e-3, gain=0.01 * s) for s in range(4)}
    runs.update({("proma", 1e-4, s): _run(1e-3, gain=0.01 * s + 0.02 + 0.001 * s) for s in (0, 1, 2)})
    c = S2.paired(runs, "proma", "grpo", "reward_gain", 1e-4, "difference")
    d = np.array([0.020, 0.021, 0.022])
    np.testing.assert_allclose(c.interval["mean"], d.mean(), rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(c.p, sps.ttest_1samp(d, 0.0).pvalue, rtol=FLOAT64_RTOL)
    # one common seed gives no interval: the contrast is left out, not shown without one
    one = {k: v for k, v in runs.items() if k[0] == "grpo" or k[2] == 0}
    assert S2.paired(one, "proma", "grpo", "reward_gain", 1e-4, "difference") is None


def test_per_rate_gives_every_rate_and_endpoint_that_has_two_seeds():
    runs = {}
    for lr in (5e-5, 1e-4, 2e-4):
        for s in range(3):
            runs[("grpo", lr, s)] = _run(1e-3, oos=5e-4, gain=0.05, entropy=0.6)
            runs[("proma", lr, s)] = _run(0.5e-3 * (1 + 0.1 * s), oos=4e-4, gain=0.04, entropy=0.7 + 0.01 * s)
    del runs[("proma", 2e-4, 1)], runs[("proma", 2e-4, 2)]  # one seed left at 2e-4: no row there
    out = S2.per_rate({"learn-240": runs}, methods=("proma",), regimes=("learn-240",))
    assert sorted({c.lr for c in out}) == [5e-5, 1e-4]
    assert len(out) == 2 * len(S2.PER_RATE_COLUMNS)
    oos = next(c for c in out if c.lr == 1e-4 and c.column == "oos_kl_mean")
    np.testing.assert_allclose(oos.interval["mean"], 0.8, rtol=FLOAT64_RTOL)
    ent = next(c for c in out if c.lr == 1e-4 and c.column == "entropy_end_ratio")
    np.testing.assert_allclose(ent.interval["mean"], 0.11, rtol=FLOAT64_RTOL)


def test_minibatch_contrasts_read_the_mb1_regimes_and_each_minibatch_of_the_plain_regime():
    mb1 = {(m, 1e-4, s): _run(1e-3 * (0.7 if m == "proma" else 1.0), oos=1e-3) for m in ("grpo", "proma")
           for s in range(3)}
    plain = {(m, 1e-4, s): _run(1e-3, local_kl_mb0=1e-3, local_kl_mb1=(2e-3 if m == "grpo" else 1e-3),
                                oos_kl_mb0=1e-3, oos_kl_mb1=1e-3) for m in ("grpo", "proma") for s in range(3)}
    out = {(c.regime, c.column): c.interval["mean"] for c in
           S2.minibatch_contrasts({"learn-240-mb1": mb1, "learn-240": plain})}
    np.testing.assert_allclose(out[("learn-240-mb1", "local_kl_mean")], 0.7, rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(out[("learn-240-mb1", "oos_kl_mean")], 1.0, rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(out[("learn-240", "local_kl_mb1")], 0.5, rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(out[("learn-240", "local_kl_mb0")], 1.0, rtol=FLOAT64_RTOL)
    assert ("learn-240", "local_kl_mean") not in out  # the plain regime's whole-run KL is per_rate's


def test_code_contrasts_compare_proma_code_with_proma_paper_at_1x():
    runs = {("proma-paper", 3e-4, s): _run(1e-3, gain=0.1) for s in range(3)}
    runs.update({("proma-code", 3e-4, s): _run(2e-3, gain=0.1 - 0.01 * (s + 1)) for s in range(3)})
    runs[("proma-paper", 6e-4, 0)] = _run(1.0)  # another rate: not 1x, not used
    out = {c.column: c for c in S2.code_contrasts({"collapse": runs}, regimes=("collapse",))}
    np.testing.assert_allclose(out["local_kl_mean"].interval["mean"], 2.0, rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(out["reward_gain"].interval["mean"], -0.02, rtol=FLOAT64_RTOL)
    assert all(c.against == "proma-paper" and c.lr == 3e-4 for c in out.values())


def test_x_summary_leaves_out_the_pilot_seeds_and_applies_the_absolute_rule():
    runs = {("grpo", 3e-4, s): _run(1e-3 * (s + 1), entropy=0.30 + 0.01 * s) for s in range(5)}
    runs.update({("grpo", 3e-4, s): _run(1.0, entropy=0.9) for s in (100, 101, 102)})  # pilot: must not count
    runs.update({("proma", 3e-4, s): _run(1e-3, entropy=0.7 + 0.01 * s) for s in range(5)})
    rows = {r["method"]: r for r in S2.x_summary(runs, seeds=range(15))}
    assert rows["grpo"]["n"] == 5
    np.testing.assert_allclose(rows["grpo"]["entropy"]["mean"], 0.32, rtol=FLOAT64_RTOL)
    assert rows["grpo"]["rule"] == "collapses" and rows["proma"]["rule"] == "avoids collapse"
    # KLs are geometric: exp(mean log)
    np.testing.assert_allclose(rows["grpo"]["local_kl"]["mean"], math.exp(np.log(1e-3 * np.arange(1, 6)).mean()),
                               rtol=FLOAT64_RTOL)
    cond = {name: verdict for name, _, verdict in S2.x_conditions(runs, seeds=range(15))}
    assert cond["GRPO collapses entropy"] == "met"


def _result(records, accuracy=0.5):
    return {"metrics": records, "final_eval": {"accuracy": accuracy}}


def _records(n=4, **override):
    recs = [{"step": k // 2, "minibatch": k % 2, "reward": 0.5 + 0.01 * k, "entropy": 1.0 - 0.1 * (k // 2),
             "local_kl": 1e-3, "time/train": 1.0, "step_time": 2.0, "oos_local_kl": 5e-4} for k in range(n)]
    for k, fields in override.items():
        recs[int(k[1:])].update(fields)
    return recs


def test_record_difference_finds_the_largest_training_difference_and_ignores_times_and_the_probe():
    old = _result(_records())
    same_but_timing = _result(_records(r1={"time/train": 9.0, "step_time": 9.0, "oos_local_kl": 9.0}))
    assert S2.record_difference(same_but_timing, old) == (0.0, "-")
    changed = _result(_records(r2={"local_kl": 1e-3 + 2.5e-7, "reward": 0.52 + 1e-9}))
    diff, where = S2.record_difference(changed, old)
    assert where == "local_kl"
    np.testing.assert_allclose(diff, 2.5e-7, rtol=1e-6)
    assert S2.record_difference(_result(_records(r0={"reward": math.nan})), old) == (math.inf, "reward")
    with pytest.raises(ValueError, match="records: 3 in the new run, 4 in the old one"):
        S2.record_difference(_result(_records(3)), old)


def test_reproduction_pairs_the_two_studies_runs_by_seed(tmp_path):
    new, old = tmp_path / "study2", tmp_path / "seeds"
    for folder, bump in ((new, 1e-6), (old, 0.0)):
        for s in (5, 7):
            path = tables.result_path(folder, "collapse", "grpo", 3e-4, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_result(_records(r3={"local_kl": 1e-3 + bump * s}), accuracy=0.5 + bump)))
    (rep,) = S2.reproduction(new, old)
    assert rep["regime"] == "collapse" and rep["seeds"] == [5, 7] and rep["field"] == "local_kl"
    np.testing.assert_allclose([rep["max_diff"], rep["val_diff"]], [7e-6, 1e-6], rtol=1e-6)


def test_rollout_curves_take_each_rollout_steps_first_record_and_scale_entropy(tmp_path):
    path = tables.result_path(tmp_path, "pool16-120", "grpo", 3e-4, 2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": {"method": "grpo", "lr": 3e-4, "seed": 2}, **_result(_records(6))}))
    curves = S2.rollout_curves(tmp_path, "pool16-120")[("grpo", 3e-4, 2)]
    np.testing.assert_allclose(curves["entropy"], [1.0, 0.9, 0.8], rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(curves["reward"], [0.50, 0.52, 0.54], rtol=FLOAT64_RTOL)


def test_seed_band_is_scipys_pointwise_t_interval():
    a = np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 2.0], [0.5, 2.2, 4.0]])
    band = S2.seed_band(a)
    lo, hi = sps.t.interval(0.95, 2, loc=a.mean(0), scale=sps.sem(a, axis=0))
    np.testing.assert_allclose(band["lo"], lo, rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(band["hi"], hi, rtol=FLOAT64_RTOL)
    with pytest.raises(ValueError, match="curves: need at least 2"):
        S2.seed_band(a[:1])


def test_the_secondary_section_renders_x_numbers_reproduction_and_the_x_figure(tmp_path):
    from verification.report import study2_secondary as R

    x = {(m, 3e-4, s): _run(1e-3, entropy=(0.3 if m == "grpo" else 0.6) + 0.01 * s, val_change=-0.01)
         for m in ("grpo", "proma") for s in range(5)}
    curves = {(m, 3e-4, s): {"entropy": np.linspace(1.0, 0.3 + 0.01 * s, 10), "reward": np.full(10, 0.5)}
              for m in ("grpo", "proma") for s in range(5)}
    study = {"results": {"pool16-120": x}, "x": "pool16-120", "x_seeds": range(15), "x_curves": curves,
             "reproduction": [{"regime": "learn-240", "seeds": [5, 6], "max_diff": 0.0, "field": "-", "val_diff": 0.0}]}
    text = "\n".join(R.section(study, []))
    assert "| grpo | 5 | 0.320 [0.300, 0.340] | collapses |" in text
    assert "| GRPO collapses entropy | entropy end/start 0.320 [0.300, 0.340] | met |" in text
    assert "`learn-240` seeds 5, 6: largest difference of any training record 0 (in `-`)" in text
    assert f"![X curves]({R.X_FIGURE})" in text
    path = R.x_curves_plot(curves, tmp_path / R.X_FIGURE, seeds=range(15))
    assert path.is_file() and path.stat().st_size > 0


def _scipy_geometric(ratios, fmt=".3f") -> str:
    logs = np.log(ratios)
    lo, hi = sps.t.interval(0.95, logs.size - 1, loc=logs.mean(), scale=sps.sem(logs))
    return f"{math.exp(logs.mean()):{fmt}} [{math.exp(lo):{fmt}}, {math.exp(hi):{fmt}}]"


def test_the_reports_kl_ratios_are_geometric_intervals_that_stay_positive():
    """Widely spread ratios: an arithmetic t-interval of them would reach below zero, which no KL ratio can."""
    from verification.report import study2_secondary as R

    ratios = np.array([0.05, 0.2, 0.9])
    gains = np.array([0.01, 0.02, 0.04])
    runs = {}
    for s, r in enumerate(ratios):
        for lr, g in zip((5e-5, 1e-4, 2e-4), gains):
            runs[("grpo", lr, s)] = _run(1e-3 * math.exp(50 * g), oos=1e-4 * math.exp(50 * g), gain=g)
            # proma's line of log K_oos on G is grpo's shifted by log r: log-ratio log r at any matched gain
            runs[("proma", lr, s)] = _run(1e-3 * math.exp(50 * g), oos=r * 1e-4 * math.exp(50 * g), gain=g)
    expected = _scipy_geometric(ratios, ".3g")   # significant figures: an extrapolated seed spans decades
    assert "-" not in _scipy_geometric(ratios).split("[")[1]
    forms = "\n".join(R.frontier_forms({"learn-240": runs}))
    assert f"| learn-240 | proma | +0.0000 [+0.0000, +0.0000] | {expected} (0 of 3 extrapolated) |" in forms
    over = "\n".join(R.oos_over_in({"learn-240": runs}))
    assert f"| learn-240 | proma | 3 | {_scipy_geometric(0.1 * ratios)} |" in over
