"""The secondary analyses of ``reports/PREREGISTRATION.md`` section 4: reported beside the verdicts, deciding nothing.

* :func:`new_seeds_only`: the family on the seeds run after the pre-registration (unadjusted p).
* :func:`kl_summaries`: each KL hypothesis on other summaries of the per-step local KL (median, last quarter,
  thirds of the run), paired log-ratio t-interval and p.
* :func:`leave_one_out`: for each hypothesis, the estimate and p over the n subsets of n - 1 seeds.
* Wilcoxon signed-rank p beside each paired t p: :func:`wilcoxon`.
* :func:`val_elsewhere`: VAL's test in the regimes other than the validation regime.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import preregistered as P
from . import stats

KL_SUMMARIES = {"local_kl_median": "median over steps", "local_kl_last_quarter": "last quarter",
                "local_kl_third_1": "first third", "local_kl_third_2": "middle third",
                "local_kl_third_3": "last third"}
UNADJUSTED = 0.05


def new_seeds_only(results: dict, **kw) -> list[P.Outcome]:
    """The family tested on :data:`verification.studies.preregistered.NEW_SEEDS` only (Holm shown, nothing decided)."""
    return P.decide(results, seeds=P.NEW_SEEDS, full=False, **kw)


def kl_summaries(results: dict, **kw) -> list[tuple[P.Hypothesis, str, dict, float]]:
    """(hypothesis, summary label, paired ratio interval, two-sided p) for every KL hypothesis and summary."""
    out = []
    for h in P.family(**kw):
        if h.kind != "kl":
            continue
        runs = results.get(h.regime, {})
        for column, label in KL_SUMMARIES.items():
            _, a, b = P.paired_values(runs, h.method, h.against, column)
            if a.size >= 2 and np.all(a > 0) and np.all(b > 0):
                out.append((h, label, stats.paired_ratio_t(a, b), stats.paired_t_p(np.log(a / b))))
    return out


def leave_one_out(results: dict, outcome: P.Outcome, others_p: list | None = None) -> dict | None:
    """Estimate and p of ``outcome``'s hypothesis over every subset of its seeds with one left out.

    Returns ``{"estimate": (min, max), "p": (min, max), "kept": k, "subsets": n}`` with k the subsets whose
    unadjusted p is below :data:`UNADJUSTED` with the estimate on the same side as the full data's; None with
    fewer than 3 seeds. With ``others_p`` (the other hypotheses' p of the family), also ``"kept_holm"``: the
    subsets whose Holm-adjusted p (Holm re-applied with the others unchanged) is below :data:`UNADJUSTED` on the
    same side, i.e. that keep a decided verdict.
    """
    h = outcome.hypothesis
    against = h.against[0] if h.kind == "val" else h.against
    seeds, _, _ = P.paired_values(results.get(h.regime, {}), h.method, against, P.COLUMN[h.kind])
    if len(seeds) < 3:
        return None
    subsets = [P.test(h, results, seeds=tuple(s for s in seeds if s != left)) for left in seeds]
    est = [o.estimate["mean"] for o in subsets]
    ps = [o.p for o in subsets]
    kept = sum(o.p < UNADJUSTED and o.supports == outcome.supports for o in subsets)
    out = {"estimate": (min(est), max(est)), "p": (min(ps), max(ps)), "kept": kept, "subsets": len(subsets)}
    if others_p is not None:
        out["kept_holm"] = sum(stats.holm([o.p, *others_p])[0] < UNADJUSTED and o.supports == outcome.supports
                               for o in subsets)
    return out


def val_elsewhere(results: dict) -> list[P.Outcome]:
    """VAL's intersection-union test in every regime of ``results`` other than the validation regime (with
    seeds of intra there), unadjusted: section 4's "VAL in *collapse* and *learn-240*"."""
    val = next(h for h in P.family() if h.kind == "val")
    out = []
    for regime in sorted(results):
        if regime != val.regime and any(m == val.method for m, _, _ in results[regime]):
            out.append(P.test(replace(val, regime=regime), results))
    return out


def wilcoxon(outcome: P.Outcome) -> float | None:
    """Exact Wilcoxon signed-rank p of the per-seed differences the outcome's t-test used (None below 2 seeds)."""
    return stats.wilcoxon_p(outcome.diffs) if len(outcome.diffs) >= 2 else None
