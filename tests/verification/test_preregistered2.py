"""verification.studies.preregistered2: the second study's family, tested on synthetic runs whose answers are known."""
from dataclasses import replace

import numpy as np
import pytest

from verification.studies import preregistered2 as P2
from verification.studies import stats
from verification.tolerances import FLOAT64_RTOL

RATES = {"learn-240": (5e-5, 1e-4, 2e-4), "collapse": (1.5e-4, 3e-4, 6e-4)}


def _run(kl, gain, entropy=0.6):
    return {"oos_kl_mean": kl, "reward_gain": gain, "entropy_end_ratio": entropy}


def frontier_runs(shift: dict, seeds=range(10), noise=0.0, rng_seed=0) -> dict:
    """Runs where every method's gain is 0.02 * log K + shift[m] (+ noise), at KL levels that differ by method."""
    rng = np.random.default_rng(rng_seed)
    runs = {}
    for m, sh in shift.items():
        for s in seeds:
            for j, lr in enumerate(RATES["learn-240"]):
                log_k = -8.0 + 1.4 * j + (0.3 if m == "proma" else 0.0) + 0.1 * rng.standard_normal()
                runs[(m, lr, s)] = _run(float(np.exp(log_k)), 0.02 * log_k + sh + noise * rng.standard_normal())
    return runs


def test_frontier_delta_is_the_gain_difference_at_matched_kl_by_an_independent_fit():
    runs = frontier_runs({"grpo": 0.0, "proma": 0.0}, seeds=[0], noise=0.01, rng_seed=3)
    delta = P2.frontier_deltas(runs, "proma", "grpo")[0]
    # independent: normal equations by hand at k* = mean of the six log KL
    ks, gs = {}, {}
    for m in ("proma", "grpo"):
        ks[m] = np.log([runs[(m, lr, 0)]["oos_kl_mean"] for lr in RATES["learn-240"]])
        gs[m] = np.array([runs[(m, lr, 0)]["reward_gain"] for lr in RATES["learn-240"]])
    k_star = np.mean(np.concatenate([ks["proma"], ks["grpo"]]))

    def fit(x, y):
        A = np.stack([np.ones_like(x), x], 1)
        coef = np.linalg.solve(A.T @ A, A.T @ y)
        return coef[0] + coef[1] * k_star

    np.testing.assert_allclose(delta, fit(ks["proma"], gs["proma"]) - fit(ks["grpo"], gs["grpo"]), rtol=FLOAT64_RTOL)


def test_a_method_on_the_same_frontier_at_a_smaller_step_shows_no_frontier_gain():
    # proma runs at a different KL (a "smaller/larger step") but on GRPO's frontier: Delta is 0 at every seed
    runs = frontier_runs({"grpo": 0.0, "proma": 0.0})
    deltas = P2.frontier_deltas(runs, "proma", "grpo")
    assert len(deltas) == 10
    np.testing.assert_allclose(list(deltas.values()), 0.0, atol=1e-12)
    # a real frontier shift of +0.01 is recovered
    shifted = P2.frontier_deltas(frontier_runs({"grpo": 0.0, "proma": 0.01}), "proma", "grpo")
    np.testing.assert_allclose(list(shifted.values()), 0.01, atol=1e-12)


def test_a_seed_missing_one_rate_is_left_out_of_the_frontier():
    runs = frontier_runs({"grpo": 0.0, "proma": 0.01}, seeds=range(3))
    del runs[("proma", 2e-4, 1)]
    assert sorted(P2.frontier_deltas(runs, "proma", "grpo")) == [0, 2]


def _family_results(effects: dict, n=10, n_x=15, x="collapse-120", rng_seed=1) -> dict:
    """Results where each hypothesis' per-seed statistic is effects[id] + N(0, 0.02) (a frontier shift, a log ratio,
    an entropy difference), built through the runs so the module computes them itself."""
    rng = np.random.default_rng(rng_seed)
    res = {"learn-240": {}, "collapse": {}, "learn-240-mb1": {}, "collapse-mb1": {}, x: {}}
    for regime, r in (("learn-240", "L"), ("collapse", "C")):
        shift = {"grpo": 0.0, "proma": 0.0, "proma-paper": 0.0}
        for s in range(n):
            for m in shift:
                sh = {"proma": effects.get(f"F-G-{r}", 0), "proma-paper": effects.get(f"F-P-{r}", 0)}.get(m, 0.0)
                for j, lr in enumerate(RATES[regime]):
                    log_k = -8.0 + 1.4 * j
                    res[regime][(m, lr, s)] = _run(float(np.exp(log_k)), 0.02 * log_k + sh + 0.02 * rng.standard_normal(),
                                                   0.6)
            one = P2.ONE_X[regime]
            base = res[regime][("proma-paper", one, s)]
            res[regime][("proma-code", one, s)] = _run(
                base["oos_kl_mean"] * np.exp(effects.get(f"CODE-K-{r}", 0) + 0.02 * rng.standard_normal()),
                0.0, base["entropy_end_ratio"] + effects.get(f"CODE-E-{r}", 0) + 0.02 * rng.standard_normal())
        for s in range(n):
            one = P2.ONE_X[regime]
            res[f"{regime}-mb1"][("grpo", one, s)] = _run(1e-3, 0.0)
            res[f"{regime}-mb1"][("proma", one, s)] = _run(
                1e-3 * np.exp(effects.get(f"M-G-{r}", 0) + 0.02 * rng.standard_normal()), 0.0)
    for s in range(n_x):
        g = 0.3 + 0.02 * rng.standard_normal()
        res[x][("grpo", 3e-4, s)] = _run(1e-3, 0.0, g)
        res[x][("reinforce", 3e-4, s)] = _run(1e-3, 0.0, g + 0.02 * rng.standard_normal())
        res[x][("proma", 3e-4, s)] = _run(1e-3, 0.0, g + effects.get("EN-G-X", 0) + 0.02 * rng.standard_normal())
        res[x][("proma-paper", 3e-4, s)] = _run(1e-3, 0.0, g + effects.get("EN-P-X", 0) + 0.02 * rng.standard_normal())
    return res


def test_the_family_has_fifteen_hypotheses_with_the_preregistered_ids():
    ids = [h.id for h in P2.family("collapse-120")]
    assert ids == ["F-G-L", "F-G-C", "F-P-L", "F-P-C", "M-G-L", "M-G-C", "EN-G-X", "EN-P-X", "EN-R-X", "AC-G-X",
                   "AC-P-X", "CODE-K-L", "CODE-K-C", "CODE-E-L", "CODE-E-C"]


def test_clear_effects_are_decided_and_nulls_are_not():
    res = _family_results({"F-G-L": 0.05, "M-G-C": -0.5, "EN-G-X": 0.2, "CODE-K-L": 0.3, "CODE-E-C": -0.2})
    out = {o.hypothesis.id: o for o in P2.decide(res, x_regime="collapse-120", pilot_over=True)}
    assert out["F-G-L"].verdict == P2.SUPPORTED
    assert out["M-G-C"].verdict == P2.SUPPORTED and out["M-G-C"].estimate["mean"] < 1
    assert out["EN-G-X"].verdict == P2.SUPPORTED
    assert out["CODE-K-L"].verdict == P2.DIFFERS_HIGHER
    assert out["CODE-E-C"].verdict == P2.DIFFERS_LOWER
    assert out["F-P-L"].verdict == P2.INCONCLUSIVE
    assert out["CODE-K-C"].verdict == P2.NO_DIFFERENCE
    # X's GRPO ends at 0.3 and proma at 0.5: proma does not demonstrably avoid collapse; the published settings,
    # at 0.3, are contradicted (they collapse)
    assert out["AC-P-X"].verdict == P2.CONTRADICTED
    assert out["AC-P-X"].estimate["mean"] == pytest.approx(0.3, abs=0.02)


def test_a_p_below_005_that_holm_lifts_above_it_is_inconclusive():
    res = _family_results({"F-G-L": 0.05, "M-G-C": -0.5, "EN-G-X": 0.2})
    outcomes = P2.decide(res, x_regime="collapse-120", pilot_over=True)
    # find a hypothesis with raw p < 0.05 whose Holm p is >= 0.05, by construction of a marginal effect
    marginal = [o for o in outcomes if o.p < P2.ALPHA <= o.p_adj]
    if not marginal:  # make one: a small effect on F-P-C
        for eff in (0.012, 0.015, 0.018, 0.02, 0.025):
            res = _family_results({"F-G-L": 0.05, "M-G-C": -0.5, "EN-G-X": 0.2, "F-P-C": eff})
            outcomes = P2.decide(res, x_regime="collapse-120", pilot_over=True)
            marginal = [o for o in outcomes if o.p < P2.ALPHA <= o.p_adj]
            if marginal:
                break
    assert marginal, "no marginal case constructed"
    for o in marginal:
        assert o.verdict in (P2.INCONCLUSIVE, P2.NO_DIFFERENCE)
    # and Holm's adjusted p are what stats.holm gives on the tested family
    np.testing.assert_allclose([o.p_adj for o in outcomes], stats.holm([o.p for o in outcomes]))


def test_nothing_is_decided_while_runs_are_missing_or_the_pilot_runs():
    res = _family_results({"F-G-L": 0.05}, n_x=14)
    assert {o.verdict for o in P2.decide(res, x_regime="collapse-120", pilot_over=True)} == {P2.IN_PROGRESS}
    res = _family_results({"F-G-L": 0.05})
    assert {o.verdict for o in P2.decide(res, x_regime=None, pilot_over=False)} == {P2.IN_PROGRESS}


def test_a_settled_verdict_is_the_one_the_completed_family_gets_whatever_the_rest_gives():
    x = "collapse-120"
    full = _family_results({"EN-G-X": 0.2}, rng_seed=3)
    # the same X runs with every other cell at 3 of its 10 seeds: X complete, the family in progress
    partial = {r: (runs if r == x else {k: v for k, v in runs.items() if k[2] < 3}) for r, runs in full.items()}
    interim = P2.decide(partial, x_regime=x, pilot_over=True)
    assert {o.verdict for o in interim} == {P2.IN_PROGRESS}
    fixed = {o.hypothesis.id: P2.settled(interim, o) for o in interim}
    # EN-G-X (effect 0.2 over 15 seeds) and AC-P-X (the published settings end at 0.3, far below 1/2) are fixed;
    # no hypothesis with missing seeds is
    assert fixed["EN-G-X"] == P2.SUPPORTED and fixed["AC-P-X"] == P2.CONTRADICTED
    assert all(v is None for k, v in fixed.items() if not k.endswith("-X"))
    from verification.report.study2_section import settled_lines
    line = settled_lines(interim)[0]
    assert "between p and 15 p" in line and "EN-G-X supported" in line and "AC-P-X contradicted" in line
    assert "F-G-L" not in line
    # completing the family with strong, null or opposite effects elsewhere never changes a fixed verdict
    for effects in ({}, {"F-G-L": 0.05, "F-P-C": -0.05, "M-G-L": -0.5, "CODE-K-C": 0.3},
                    {"F-G-C": 0.012, "M-G-C": 0.03, "CODE-E-L": 0.015}):
        other = _family_results(effects, rng_seed=7)
        other[x] = full[x]
        final = {o.hypothesis.id: o.verdict for o in P2.decide(other, x_regime=x, pilot_over=True)}
        for k, v in fixed.items():
            if v is not None:
                assert final[k] == v, (k, effects)
    # a p between alpha / m and alpha is not fixed: with m = 15 and p = 0.01 Holm may or may not lift it
    o = next(o for o in interim if o.hypothesis.id == "EN-G-X")
    assert P2.settled(interim, replace(o, p=0.01)) is None
    assert P2.settled(interim, replace(o, p=0.05)) == P2.INCONCLUSIVE
    assert P2.settled(interim, replace(o, p=0.05 / 15 * 0.99)) == P2.SUPPORTED
    # a decided outcome is not "settled": it is decided
    assert P2.settled(interim, replace(o, verdict=P2.SUPPORTED)) is None


def test_settled_is_none_exactly_where_the_other_hypotheses_can_still_decide_it():
    """At p just above alpha / m, whether Holm rejects depends on the others' p (ranked first: adjusted m p; ranked
    last: p), so ``settled`` must say nothing; just below alpha / m, and at alpha, no completion can change it."""
    res = _family_results({"EN-G-X": 0.2}, rng_seed=3)
    partial = {r: (runs if r == "collapse-120" else {k: v for k, v in runs.items() if k[2] < 3}) for r, runs in res.items()}
    interim = P2.decide(partial, x_regime="collapse-120", pilot_over=True)
    o = next(x for x in interim if x.hypothesis.id == "EN-G-X")
    m = P2.family_size(interim)
    assert m == 15
    for factor, want in ((1.01, None), (0.99, P2.SUPPORTED)):
        p = factor * P2.ALPHA / m
        ranked_first, ranked_last = stats.holm([p] + [1.0] * (m - 1))[0], stats.holm([p] + [1e-12] * (m - 1))[0]
        assert ranked_last < P2.ALPHA      # every completion where the rest is small rejects it
        assert (ranked_first < P2.ALPHA) == (want is not None)   # and the worst completion rejects it only below a/m
        assert P2.settled(interim, replace(o, p=p)) == want
    # while the pilot runs, X stays in the family (m = 15, conservative: m can only fall to 10 without X)
    running = P2.decide(partial, x_regime=None, pilot_over=False)
    assert P2.family_size(running) == 15


def test_without_an_accepted_x_its_five_hypotheses_leave_the_family():
    res = _family_results({"F-G-L": 0.05})
    out = P2.decide(res, x_regime=None, pilot_over=True)
    dropped = [o for o in out if o.verdict == P2.NOT_TESTED]
    assert [o.hypothesis.id for o in dropped] == ["EN-G-X", "EN-P-X", "EN-R-X", "AC-G-X", "AC-P-X"]
    tested = [o for o in out if o.verdict != P2.NOT_TESTED]
    np.testing.assert_allclose([o.p_adj for o in tested], stats.holm([o.p for o in tested]))
    assert len(tested) == 10


def test_leave_one_out_counts_subsets_that_keep_the_direction_under_holm():
    res = _family_results({"F-G-L": 0.05, "M-G-C": -0.5})
    outcomes = P2.decide(res, x_regime="collapse-120", pilot_over=True)
    o = next(x for x in outcomes if x.hypothesis.id == "F-G-L")
    loo = P2.leave_one_out(outcomes, o)
    assert loo == {"subsets": 10, "kept": 10}
    # an outcome pointing nowhere keeps nothing
    null = next(x for x in outcomes if x.hypothesis.id == "F-P-L")
    assert P2.leave_one_out(outcomes, null)["kept"] <= 1


def test_the_report_section_and_figures_render_from_a_complete_synthetic_study(tmp_path):
    from verification.report import study2_section as R

    res = _family_results({"F-G-L": 0.05, "M-G-C": -0.5, "EN-G-X": 0.2, "CODE-K-L": 0.3})
    for regime in res.values():  # in-sample KL for the secondary tables (half the out-of-sample KL)
        for v in regime.values():
            v["local_kl_mean"] = v["oos_kl_mean"] * 2
    study = {"results": res, "x": "collapse-120", "pilot_over": True, "runs": 320, "planned": 320,
             "pilot": [("collapse-120", stats.t_interval([0.3, 0.31, 0.29, 0.32, 0.28]))], "run_seconds": 3600.0,
             "commits": {"abc1234": 320}}
    text = "\n".join(R.section(study))
    assert "| F-G-L |" in text and "**supported**" in text and "**differs (higher)**" in text
    assert "accepted `collapse-120`" in text and "In progress" not in text
    assert "| learn-240 | grpo | 10 | 0.500 [0.500, 0.500] |" in text
    paths = R.figures(study, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def test_the_cost_line_applies_section_6s_overrun_rule_to_the_projected_total():
    from verification.report import study2_section as R

    # 10 done + 16 left = 26 worker-hours: within 20% of the 25 budgeted
    within = R.budget_line({"run_seconds": 10 * 3600.0, "hours_left": (16.0, 9.0)})
    assert "10.0 worker-hours so far, about 16.0 left" in within and "(9.0 at each cell's fastest" in within
    assert "the projected 26.0 is within 20% of it" in within
    # 10 + 20.5 = 30.5 > 25 x 1.2 = 30: the rule acts
    over = R.budget_line({"run_seconds": 10 * 3600.0, "hours_left": (20.5, None)})
    assert "the projected 30.5 exceeds it by more than 20%" in over and "fastest" not in over
    assert "frontier cells keep 10 seeds" in over and "item 6" in over


def test_power_lines_name_each_undecided_hypothesis_its_seeds_side_and_holm_level():
    from verification.report import study2_section as R

    h = {x.id: x for x in P2.family()}
    iv = {"mean": 0.0, "lo": -1.0, "hi": 1.0}
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(10)
    spread = (spread - spread.mean()) / spread.std(ddof=1)   # mean 0 (to rounding), sd 1
    outcomes = [
        # decided: no power line
        P2.Outcome(h["M-G-L"], 10, iv, 1e-6, True, tuple(-1.0 + 0.1 * spread), 3e-6, P2.SUPPORTED),
        # undecided, against the claim: mean -0.5, sd 1, third smallest p of three -> Holm level 0.05 / 2
        P2.Outcome(h["F-G-L"], 10, iv, 0.2, False, tuple(-0.5 + spread), 0.4, P2.INCONCLUSIVE),
        # undecided CODE (two-sided): observed side "lower"; largest p -> Holm level 0.05 / 1
        P2.Outcome(h["CODE-E-L"], 10, iv, 0.9, False, tuple(0.0 + spread), 0.9, P2.NO_DIFFERENCE),
    ]
    lines = R.power_lines(outcomes)
    assert len(lines) == 2
    n = stats.seeds_for_power(-0.5 + spread, 0.025)
    assert 38 <= n <= 44   # (z_.9875 + z_.8)^2 / 0.5^2 = 38 by the normal approximation; t adds a few
    assert lines[0] == (f"- F-G-L: about {n} seeds (10 now), to decide it on the observed side (against the claim) "
                        "at its Holm level 0.025.")
    assert lines[1] == ("- CODE-E-L: more than 10,000 seeds (10 now; the observed effect is near 0 against its "
                        "spread), to decide it on the observed side (lower) at its Holm level 0.05.")


def test_the_cost_line_of_a_finished_study_gives_the_total_not_a_projection():
    from verification.report import study2_section as R

    done = R.budget_line({"run_seconds": 31.8 * 3600.0, "hours_left": (0.0, None)})
    assert done.startswith("Cost: 31.8 worker-hours, every planned run done;")
    assert "the total 31.8 exceeds it by more than 20%" in done and "left" not in done
