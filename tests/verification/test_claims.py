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
