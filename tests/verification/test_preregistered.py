"""The pre-registered family (verification.studies.preregistered) and its statistics, on synthetic per-seed numbers.

Independent evidence: Holm against its definition on hand-worked values, the t p-value against SciPy's
``ttest_1samp``, the power formula against a Monte-Carlo simulation of the t-test.
"""
import numpy as np
import pytest
from scipy import stats as sps

from verification.studies import preregistered as P
from verification.studies import secondary, stats

METHODS = ("reinforce", "grpo", "proma", "proma-paper", "intra")
LR = {"learn-240": 1e-4, "collapse": 3e-4, P.DEFAULT_VALIDATION_REGIME: 5e-5}
MC_TRIALS = 20_000
MC_TOL = 0.015   # Monte-Carlo standard error of a power near 0.8 with 20k trials is 0.003


def synthetic(n_seeds=15, *, kl=None, ent=None, val=None, noise=0.02, seed=0):
    """``{regime: runs}`` with per-method centres and independent multiplicative noise per run."""
    rng = np.random.default_rng(seed)
    kl = {"reinforce": 1.3, "grpo": 1.0, "proma": 0.8, "proma-paper": 1.0, "intra": 0.5, **(kl or {})}
    ent = {"reinforce": 0.3, "grpo": 0.3, "proma": 0.4, "proma-paper": 0.3, "intra": 0.4, **(ent or {})}
    val = {"reinforce": 0.30, "grpo": 0.30, "proma": 0.30, "proma-paper": 0.30, "intra": 0.30, **(val or {})}
    out = {}
    for regime, lr in LR.items():
        out[regime] = {(m, lr, s): {"local_kl_mean": kl[m] * (1 + noise * rng.standard_normal()),
                                    "entropy_end_ratio": ent[m] + noise * rng.standard_normal(),
                                    "val_final": val[m] + noise / 10 * rng.standard_normal()}
                       for m in METHODS for s in range(n_seeds)}
    return out


def by_id(outcomes):
    return {o.hypothesis.id: o for o in outcomes}


def test_family_is_the_eleven_registered_hypotheses():
    ids = [h.id for h in P.family()]
    assert ids == ["KL-G-L", "KL-G-C", "KL-R-L", "KL-R-C", "KL-P-L", "KL-P-C",
                   "EN-G-L", "EN-G-C", "EN-P-L", "EN-P-C", "VAL"]
    assert by_id([P.Outcome(h, 0, None, 1.0, False) for h in P.family()])["KL-R-C"].hypothesis.against == "reinforce"
    assert P.family("heldout-x")[-1].regime == "heldout-x"


def test_clear_effects_are_decided_each_way():
    out = by_id(P.decide(synthetic(kl={"proma-paper": 1.5}, ent={"proma-paper": 0.2}, val={"intra": 0.35})))
    assert out["KL-G-L"].verdict == P.SUPPORTED and out["KL-G-L"].estimate["mean"] == pytest.approx(0.8, rel=0.02)
    assert out["KL-R-C"].verdict == P.SUPPORTED
    assert out["KL-P-L"].verdict == P.CONTRADICTED     # the published settings loosen the KL here
    assert out["EN-G-C"].verdict == P.SUPPORTED and out["EN-P-C"].verdict == P.CONTRADICTED
    assert out["VAL"].verdict == P.SUPPORTED and out["VAL"].supports and set(out["VAL"].parts) == set(P.VAL_OTHERS)


def test_no_effect_is_inconclusive_and_holm_is_never_below_raw_p():
    res = synthetic(kl={m: 1.0 for m in METHODS}, ent={m: 0.3 for m in METHODS}, seed=3)
    out = P.decide(res)
    assert all(o.p_adj >= o.p for o in out)
    assert sum(o.verdict == P.INCONCLUSIVE for o in out) >= 10


def test_in_progress_until_every_comparison_has_fifteen_seeds_and_quick_never_judges():
    res = synthetic()
    res["collapse"] = {k: v for k, v in res["collapse"].items() if not (k[0] == "intra" or k[2] == 14)}
    out = P.decide(res)
    assert {o.verdict for o in out} == {P.IN_PROGRESS}
    assert by_id(out)["KL-G-C"].n == 14 and by_id(out)["KL-G-L"].n == 15
    assert {o.verdict for o in P.decide(synthetic(), full=False)} == {P.NOT_JUDGED}


def test_val_intersection_union_and_its_opposite():
    up = by_id(P.decide(synthetic(val={"intra": 0.31, "grpo": 0.305})))["VAL"]
    # every comparison positive: p is the largest of the four, here the one against grpo (the closest method)
    assert up.supports and up.binding == "grpo" and up.p == max(p for _, p, _ in up.parts.values())
    down = by_id(P.decide(synthetic(val={"intra": 0.29})))["VAL"]
    worst = min(p for iv, p, _ in down.parts.values() if iv["mean"] <= 0)
    assert not down.supports and down.p == pytest.approx(min(1.0, 4 * worst))


def test_paired_t_p_matches_scipy_and_holm_matches_hand_values():
    d = np.array([0.1, 0.2, 0.15, 0.05, -0.02])
    assert stats.paired_t_p(d) == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, rel=1e-12)
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4 x 0.01, max(0.04, 3 x 0.03), max(0.09, 2 x 0.04), max(0.09, 0.2)
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="pvalues"):
        stats.holm([0.1, 1.5])
    assert stats.wilcoxon_p([0.1, 0.2, 0.15, 0.05, 0.3]) == pytest.approx(0.0625)   # 2 / 2^5


def test_seeds_for_power_against_simulation():
    rng = np.random.default_rng(1)
    d = np.log([0.745, 1.050, 0.747, 0.763, 0.796])   # the first study's per-seed KL ratios (issue 21)
    assert stats.seeds_for_power(d, 0.05) == 7 and stats.seeds_for_power(d, 0.05 / 11) == 11
    effect, sd, alpha = abs(d.mean()), d.std(ddof=1), 0.05 / 11
    for n in (10, 11):
        x = effect + sd * rng.standard_normal((MC_TRIALS, n))
        t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(n))
        simulated = np.mean(np.abs(t) > sps.t.ppf(1 - alpha / 2, n - 1))
        assert simulated == pytest.approx(stats.paired_t_power(effect, sd, n, alpha), abs=MC_TOL)
    assert stats.paired_t_power(effect, sd, 10, alpha) < 0.8 <= stats.paired_t_power(effect, sd, 11, alpha)
    assert stats.seeds_for_power([0.1, -0.1, 0.1, -0.1], 0.05) is None   # zero mean: no number of seeds


def test_secondary_analyses_report_without_deciding():
    res = synthetic()
    for runs in res.values():
        for v in runs.values():
            v.update(local_kl_median=v["local_kl_mean"], local_kl_last_quarter=v["local_kl_mean"],
                     local_kl_third_1=v["local_kl_mean"], local_kl_third_2=v["local_kl_mean"],
                     local_kl_third_3=v["local_kl_mean"])
    new = secondary.new_seeds_only(res)
    assert {o.n for o in new} == {10} and {o.verdict for o in new} == {P.NOT_JUDGED}
    rows = secondary.kl_summaries(res)
    assert len(rows) == 6 * len(secondary.KL_SUMMARIES)
    assert rows[0][2]["mean"] == pytest.approx(by_id(P.decide(res))["KL-G-L"].estimate["mean"])
    loo = secondary.leave_one_out(res, by_id(P.decide(res))["KL-G-L"])
    assert loo["subsets"] == 15 and loo["kept"] == 15 and loo["estimate"][0] <= 0.8 * 1.02


def test_validation_regime_is_the_pilots_accepted_candidate_in_the_full_grid():
    """Amendment 3: VAL is judged in the full grid's validation regime, whose runs are exactly the held-out pilot's
    (same preset overrides and learning rate), so the pilot's GRPO seeds 0-4 are that regime's seeds 0-4."""
    from verification.studies import seeds as S

    assert P.DEFAULT_VALIDATION_REGIME == S.VALIDATION_REGIME == next(h for h in P.family() if h.id == "VAL").regime
    full = S.GRIDS["full"]
    assert full.regimes[S.VALIDATION_REGIME] == S.HELDOUT_GRID.regimes[S.VALIDATION_REGIME] == dict(
        train_pool=0, warmstart_steps=1000, steps=480)
    assert full.lrs[S.VALIDATION_REGIME] == S.HELDOUT_GRID.lrs[S.VALIDATION_REGIME] == (5e-5,)
    assert set(full.methods) == set(METHODS) and tuple(full.seeds) == tuple(range(15))


def test_val_elsewhere_tests_val_in_the_other_regimes_only():
    results = synthetic(val={"intra": 0.35})
    others = secondary.val_elsewhere(results)
    assert [o.hypothesis.regime for o in others] == ["collapse", "learn-240"]
    assert all(o.hypothesis.id == "VAL" and o.n == 15 and o.supports for o in others)
    main = by_id(P.decide(results))["VAL"]
    assert main.hypothesis.regime == P.DEFAULT_VALIDATION_REGIME and main.p != others[0].p
    # a regime without intra's runs is left out
    assert secondary.val_elsewhere({**results, "collapse": {k: v for k, v in results["collapse"].items()
                                                             if k[0] != "intra"}})[0].hypothesis.regime == "learn-240"


def _family_with_one_effect(p_target: float):
    """``{regime: runs}`` (15 seeds) where KL-G-L's paired t-test has unadjusted p = ``p_target`` (PROMA's KL
    lower) and every other hypothesis of the family has t = 0 (p = 1)."""
    rng = np.random.default_rng(5)
    n = 15

    def centred():
        z = rng.standard_normal(n)
        return (z - z.mean()) / z.std(ddof=1)

    t_needed = sps.t.ppf(1 - p_target / 2, n - 1)
    shift = -t_needed / np.sqrt(n)   # d = shift + z (sd 1): t = shift sqrt(n)
    base = 1.0 + 0.05 * np.arange(n)
    out = {}
    for regime, lr in LR.items():
        kl_proma = (shift if regime == "learn-240" else 0.0) + centred()
        logkl = {"grpo": np.zeros(n), "proma": kl_proma, "reinforce": kl_proma + centred(), "proma-paper": centred(),
                 "intra": centred()}
        ent = {"grpo": np.zeros(n), "proma": centred(), "proma-paper": centred(), "reinforce": centred(),
               "intra": centred()}
        val = {m: np.zeros(n) for m in METHODS}
        val["intra"] = 0.01 * centred()
        out[regime] = {(m, lr, s): {"local_kl_mean": float(base[s] * np.exp(logkl[m][s])),
                                    "entropy_end_ratio": float(0.3 + 0.01 * ent[m][s]),
                                    "val_final": float(0.3 + val[m][s])}
                       for m in METHODS for s in range(n)}
    return out


def test_a_p_below_alpha_that_holm_lifts_above_it_is_inconclusive():
    """Verdicts are decided on the Holm-adjusted p, not the raw one: KL-G-L at p = 0.02 < 0.05 is one of eleven
    hypotheses (the others at p = 1), so Holm multiplies it by 11 (0.22 >= 0.05): inconclusive. (A planted bug that
    decided on the unadjusted p called it supported.) The same effect at p = 1e-4 stays supported after Holm."""
    out = by_id(P.decide(_family_with_one_effect(0.02)))
    kl = out["KL-G-L"]
    assert kl.p == pytest.approx(0.02, rel=1e-6) and kl.supports
    assert kl.p_adj == pytest.approx(11 * 0.02, rel=1e-6)
    assert kl.p < P.ALPHA <= kl.p_adj
    assert kl.verdict == P.INCONCLUSIVE
    assert all(o.verdict == P.INCONCLUSIVE for o in out.values())
    strong = by_id(P.decide(_family_with_one_effect(1e-4)))["KL-G-L"]
    assert strong.p_adj == pytest.approx(11e-4, rel=1e-6) and strong.verdict == P.SUPPORTED
