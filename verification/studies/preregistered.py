"""The primary family of ``reports/PREREGISTRATION.md``: eleven hypotheses, their tests, Holm, the verdicts.

Input: ``{regime: runs}`` with ``runs = {(method, lr, seed): per-run numbers}``
(:func:`verification.studies.tables.load_results`; one learning rate per regime). Every comparison is paired by
seed over the seeds both methods ran.

Tests (n paired seeds, two-sided):

* KL hypotheses: paired t-test of d_k = log(KL_method,k / KL_against,k); estimate exp(mean d) with its 95%
  t-interval; support = ratio < 1.
* Entropy hypotheses: paired t-test of d_k = R_method,k - R_grpo,k with R = ``entropy_end_ratio``; support = d > 0.
* VAL (intra best on validation): d_m,k = val_intra,k - val_m,k for the four other methods m. If every mean is
  positive, p = max_m p_m (intersection-union test); else p = min(1, 4 min over negative m of p_m), against.

Holm's step-down across the family at :data:`ALPHA`; verdict = supported / contradicted when the adjusted p is
below alpha with the estimate for / against the claim, else inconclusive. Before every comparison of the family
has :data:`N_SEEDS` seeds the verdict is "in progress" (the numbers are shown, nothing is decided).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import stats

ALPHA = 0.05
N_SEEDS = 15
NEW_SEEDS = tuple(range(5, 15))   # the seeds run after the pre-registration
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
IN_PROGRESS, NOT_JUDGED = "in progress", "not judged (not the full study)"
# where VAL is judged: the regime the held-out pilot accepted (PILOT.md section 7, PREREGISTRATION.md amendment 3;
# verification.studies.seeds.VALIDATION_REGIME, checked equal by the tests)
DEFAULT_VALIDATION_REGIME = "heldout-all-lr5e-5"
VAL_OTHERS = ("grpo", "proma", "proma-paper", "reinforce")
COLUMN = {"kl": "local_kl_mean", "entropy": "entropy_end_ratio", "val": "val_final"}


@dataclass(frozen=True)
class Hypothesis:
    """One member of the family: ``method`` compared with ``against`` (a method, or a tuple for VAL)."""

    id: str
    claim: str
    regime: str
    kind: str           # "kl" | "entropy" | "val"
    method: str
    against: str | tuple


def family(validation_regime: str = DEFAULT_VALIDATION_REGIME) -> tuple[Hypothesis, ...]:
    """The eleven hypotheses of PREREGISTRATION.md section 2, in its order."""
    regimes = (("learn-240", "L"), ("collapse", "C"))
    kl = (("G", "exact PROMA keeps the local KL tighter than GRPO", "proma", "grpo"),
          ("R", "the projection tightens the local KL (PROMA vs REINFORCE)", "proma", "reinforce"),
          ("P", "the published settings keep the local KL tighter than GRPO", "proma-paper", "grpo"))
    entropy = (("G", "exact PROMA keeps more entropy than GRPO", "proma"),
               ("P", "the published settings keep more entropy than GRPO", "proma-paper"))
    out = [Hypothesis(f"KL-{tag}-{r}", claim, regime, "kl", method, against)
           for tag, claim, method, against in kl for regime, r in regimes]
    out += [Hypothesis(f"EN-{tag}-{r}", claim, regime, "entropy", method, "grpo")
            for tag, claim, method in entropy for regime, r in regimes]
    out.append(Hypothesis("VAL", "intra is best on validation", validation_regime, "val", "intra", VAL_OTHERS))
    return tuple(out)


@dataclass(frozen=True)
class Outcome:
    """A hypothesis tested: n paired seeds, its estimate (interval dict), p, and the decision after Holm.

    ``parts``: VAL's per-method comparisons ``{m: (interval, p, per-seed d)}``; ``diffs``: the per-seed d_k the test used
    (VAL: the binding comparison's), for power and robustness analyses.
    """

    hypothesis: Hypothesis
    n: int
    estimate: dict | None
    p: float
    supports: bool      # the estimate points the way of the claim
    diffs: tuple = ()
    parts: dict | None = None
    binding: str | None = None     # VAL: the comparison whose p is the hypothesis's p
    p_adj: float = float("nan")
    verdict: str = IN_PROGRESS


def _lr(runs: dict) -> float | None:
    lrs = sorted({lr for _, lr, _ in runs})
    if len(lrs) > 1:
        raise ValueError(f"one learning rate per regime expected; found {lrs}")
    return lrs[0] if lrs else None


def paired_values(runs: dict, a: str, b: str, column: str, seeds=None) -> tuple[list, np.ndarray, np.ndarray]:
    """(seeds, a's values, b's values) over the seeds both methods ran (restricted to ``seeds`` if given)."""
    lr = _lr(runs)
    both = sorted(s for m, ll, s in runs if m == a and ll == lr and (b, lr, s) in runs
                  and (seeds is None or s in seeds))
    return (both, np.array([runs[(a, lr, s)][column] for s in both]),
            np.array([runs[(b, lr, s)][column] for s in both]))


def _two(h: Hypothesis, runs: dict, seeds) -> Outcome:
    _, a, b = paired_values(runs, h.method, h.against, COLUMN[h.kind], seeds)
    if a.size < 2:
        return Outcome(h, int(a.size), None, 1.0, False)
    if h.kind == "kl":
        d = np.log(a / b)
        return Outcome(h, a.size, stats.paired_ratio_t(a, b), stats.paired_t_p(d), bool(d.mean() < 0), tuple(d))
    d = a - b
    return Outcome(h, a.size, stats.paired_difference_t(a, b), stats.paired_t_p(d), bool(d.mean() > 0), tuple(d))


def _val(h: Hypothesis, runs: dict, seeds) -> Outcome:
    parts = {}
    for m in h.against:
        _, a, b = paired_values(runs, h.method, m, COLUMN["val"], seeds)
        if a.size < 2:
            return Outcome(h, int(a.size), None, 1.0, False)
        parts[m] = (stats.paired_difference_t(a, b), stats.paired_t_p(a - b), tuple(a - b))
    n = min(iv["n"] for iv, _, _ in parts.values())
    if all(iv["mean"] > 0 for iv, _, _ in parts.values()):
        binding = max(parts, key=lambda m: parts[m][1])
        return Outcome(h, n, parts[binding][0], parts[binding][1], True, parts[binding][2], parts, binding)
    worse = [m for m in parts if parts[m][0]["mean"] <= 0]
    binding = min(worse, key=lambda m: parts[m][1])
    p = min(1.0, len(parts) * parts[binding][1])
    return Outcome(h, n, parts[binding][0], p, False, parts[binding][2], parts, binding)


def test(h: Hypothesis, results: dict, seeds=None) -> Outcome:
    """Test one hypothesis on ``results = {regime: runs}`` (only ``seeds`` if given); no Holm yet."""
    runs = results.get(h.regime, {})
    return _val(h, runs, seeds) if h.kind == "val" else _two(h, runs, seeds)


def decide(results: dict, *, full: bool = True, validation_regime: str = DEFAULT_VALIDATION_REGIME,
           alpha: float = ALPHA, seeds=None, n_required: int = N_SEEDS) -> list[Outcome]:
    """Every hypothesis of :func:`family` tested, Holm-adjusted across the family, and decided.

    ``full=False`` (quick/smoke reports): numbers only, verdict :data:`NOT_JUDGED`. A family with any
    comparison on fewer than ``n_required`` seeds is :data:`IN_PROGRESS`: adjusted p shown, nothing decided.
    """
    outcomes = [test(h, results, seeds) for h in family(validation_regime)]
    adj = stats.holm([o.p for o in outcomes])
    complete = all(o.n >= n_required for o in outcomes)
    out = []
    for o, pa in zip(outcomes, adj):
        if not full:
            verdict = NOT_JUDGED
        elif not complete:
            verdict = IN_PROGRESS
        elif pa < alpha:
            verdict = SUPPORTED if o.supports else CONTRADICTED
        else:
            verdict = INCONCLUSIVE
        out.append(replace(o, p_adj=pa, verdict=verdict))
    return out


def holm_level(outcomes: list[Outcome], o: Outcome, alpha: float = ALPHA) -> float:
    """The level Holm applies to ``o`` at its rank: alpha / (m - rank + 1), rank 1 for the smallest p."""
    rank = sorted(x.p for x in outcomes).index(o.p) + 1
    return alpha / (len(outcomes) - rank + 1)


def seeds_needed(outcomes: list[Outcome], o: Outcome, alpha: float = ALPHA) -> int | None:
    """Seeds for 80% power at ``o``'s observed effect and spread, at its Holm level.

    VAL in the direction of the claim: the most any of its four comparisons needs (each must be won); None where
    the observed effect is 0, points against the claim (VAL), or needs more than
    :data:`verification.studies.stats.MAX_POWER_SEEDS`.
    """
    level = holm_level(outcomes, o, alpha)
    if o.parts is None:
        return stats.seeds_for_power(o.diffs, level) if len(o.diffs) >= 2 else None
    if not o.supports:
        return None
    needed = [stats.seeds_for_power(d, level) for _, _, d in o.parts.values()]
    return None if None in needed else max(needed)
