"""verification.claims: every verdict of every claim on synthetic per-seed numbers."""
import numpy as np
import pytest

from verification import claims as V

SEEDS = range(5)
JITTER = np.array([-0.02, 0.01, 0.0, 0.015, -0.005])  # per-seed noise, small against the effects below


def runs_from(columns: dict, lr: float = 1e-3) -> dict:
    """``{(method, lr, seed): numbers}`` from ``{method: {column: centre}}`` with multiplicative jitter."""
    return {(m, lr, s): {c: v * (1 + JITTER[s]) for c, v in cols.items()} for m, cols in columns.items() for s in SEEDS}


def test_kl_claim_each_verdict():
    base = {"grpo": {"local_kl_mean": 1.0}}
    assert V.judge_kl(runs_from({**base, "proma": {"local_kl_mean": 0.7}}), 1e-3)[1] == V.SUPPORTED
    assert V.judge_kl(runs_from({**base, "proma": {"local_kl_mean": 1.3}}), 1e-3)[1] == V.CONTRADICTED
    noisy = runs_from({**base, "proma": {"local_kl_mean": 1.0}})
    for s, f in zip(SEEDS, [0.6, 1.5, 0.8, 1.3, 1.0]):
        noisy[("proma", 1e-3, s)]["local_kl_mean"] = f
    evidence, verdict = V.judge_kl(noisy, 1e-3)
    assert verdict == V.INCONCLUSIVE and "ratio" in evidence


def test_kl_claim_needs_enough_seeds():
    runs = {k: v for k, v in runs_from({"grpo": {"local_kl_mean": 1.0}, "proma": {"local_kl_mean": 0.5}}).items()
            if k[2] < V.MIN_SEEDS - 1}
    assert V.judge_kl(runs, 1e-3)[1] == V.INCONCLUSIVE


@pytest.mark.parametrize("grpo, proma, expected", [
    (0.3, 0.8, V.SUPPORTED), (0.3, 0.35, V.CONTRADICTED), (0.8, 0.9, V.INCONCLUSIVE)])
def test_entropy_claim_each_verdict(grpo, proma, expected):
    runs = runs_from({"grpo": {"entropy_end_ratio": grpo}, "proma": {"entropy_end_ratio": proma}})
    evidence, verdict = V.judge_entropy(runs, 1e-3)
    assert verdict == expected
    assert ("baseline does not collapse" in evidence) == (grpo > V.COLLAPSE_FRACTION)


def test_entropy_claim_straddling_half_is_inconclusive():
    runs = runs_from({"grpo": {"entropy_end_ratio": 0.3}, "proma": {"entropy_end_ratio": 0.5}})
    for s, f in zip(SEEDS, [0.2, 0.8, 0.4, 0.6, 0.5]):
        runs[("proma", 1e-3, s)]["entropy_end_ratio"] = f
    assert V.judge_entropy(runs, 1e-3)[1] == V.INCONCLUSIVE


@pytest.mark.parametrize("intra, expected", [(0.70, V.SUPPORTED), (0.60, V.CONTRADICTED)])
def test_intra_claim_each_verdict(intra, expected):
    runs = runs_from({"grpo": {"val_final": 0.65}, "proma": {"val_final": 0.66}, "intra": {"val_final": intra}})
    assert V.judge_intra(runs, 1e-3)[1] == expected


def test_intra_claim_within_noise_is_inconclusive():
    runs = runs_from({"grpo": {"val_final": 0.65}, "proma": {"val_final": 0.66}, "intra": {"val_final": 0.66}})
    for s, v in zip(SEEDS, [0.62, 0.70, 0.64, 0.69, 0.66]):
        runs[("intra", 1e-3, s)]["val_final"] = v
    evidence, verdict = V.judge_intra(runs, 1e-3)
    assert verdict == V.INCONCLUSIVE and "vs grpo" in evidence and "vs proma" in evidence


def test_quick_mode_never_judges_and_full_mode_does():
    runs = runs_from({"grpo": {"local_kl_mean": 1.0, "entropy_end_ratio": 0.3, "val_final": 0.6},
                      "proma": {"local_kl_mean": 0.5, "entropy_end_ratio": 0.9, "val_final": 0.6},
                      "intra": {"local_kl_mean": 0.5, "entropy_end_ratio": 0.9, "val_final": 0.7}})
    quick = V.verdicts({"learn": runs}, mode="quick")
    assert len(quick) == 3 and all(v.verdict == V.NOT_JUDGED_QUICK for v in quick)
    full = V.verdicts({"learn": runs}, mode="full")
    assert [v.verdict for v in full] == [V.SUPPORTED] * 3
    table = V.markdown(full)
    assert table.count("**supported**") == 3 and "learn, lr 0.001" in table


@pytest.mark.parametrize("gain, change, expected", [
    (0.10, 0.01, V.MET),        # learns, validation holds
    (0.10, -0.05, V.NOT_MET),   # reward rises on the pool while held-out accuracy falls
    (0.001, 0.01, V.NOT_MET)])  # gain within noise: JITTER's spread straddles 0 only when the gain is tiny
def test_regime_learns_rule(gain, change, expected):
    runs = runs_from({"grpo": {"reward_gain": gain, "val_change": change}})
    if gain < 0.01:
        for s, g in zip(SEEDS, [-0.02, 0.03, 0.0, 0.01, -0.015]):
            runs[("grpo", 1e-3, s)]["reward_gain"] = g
    evidence, verdict = V.check_learns(runs, 1e-3)
    assert verdict == expected and "reward gain" in evidence and "validation change" in evidence


def test_regime_learns_without_start_validation_is_not_met():
    runs = runs_from({"grpo": {"reward_gain": 0.1}})
    assert V.check_learns(runs, 1e-3) == (V.check_learns(runs, 1e-3)[0], V.NOT_MET)


@pytest.mark.parametrize("ratio, expected", [(0.3, V.MET), (0.8, V.NOT_MET)])
def test_regime_collapse_rule(ratio, expected):
    assert V.check_collapses(runs_from({"grpo": {"entropy_end_ratio": ratio}}), 1e-3)[1] == expected


def test_regime_collapse_straddling_half_is_not_met():
    runs = runs_from({"grpo": {"entropy_end_ratio": 0.45}})
    for s, r in zip(SEEDS, [0.30, 0.60, 0.40, 0.55, 0.40]):  # mean 0.45, 95% interval [0.298, 0.602]
        runs[("grpo", 1e-3, s)]["entropy_end_ratio"] = r
    evidence, verdict = V.check_collapses(runs, 1e-3)
    assert verdict == V.NOT_MET and "0.450 [0.298, 0.602]" in evidence


def test_regime_checks_need_seeds_and_full_mode():
    runs = runs_from({"grpo": {"reward_gain": 0.1, "val_change": 0.0, "entropy_end_ratio": 0.3}})
    full = V.regime_checks({"learn": runs}, mode="full")
    assert [(c.claim, c.verdict) for c in full] == [("GRPO learns", V.MET), ("GRPO collapses entropy", V.MET)]
    assert {c.verdict for c in V.regime_checks({"learn": runs}, mode="quick")} == {V.NOT_JUDGED_QUICK}
    few = {k: v for k, v in runs.items() if k[2] < 3}
    assert {c.verdict for c in V.regime_checks({"learn": few}, mode="full")} == {V.INCONCLUSIVE}
    assert "| condition | rule" in V.markdown(full, first="condition")
