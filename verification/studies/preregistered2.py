"""The primary family of ``reports/PREREGISTRATION-2.md``: fifteen hypotheses, their tests, Holm, the verdicts.

Input: ``{regime: runs}`` with ``runs = {(method, lr, seed): per-run numbers}`` (:func:`verification.studies.tables.
load_results` on ``reports/data/study2``), and the regime *X* the pilot accepted (None: not accepted, or the pilot
is not over; see ``pilot_over``).

Tests (two-sided t over seeds; paired by seed where two methods are compared):

* F (frontier): per seed s and method m, the least-squares line h_{m,s}(k) = a + b k through the three points
  (log K_oos, reward gain) of its three learning rates; k*_s = mean of the six log K_oos of m and GRPO;
  Delta_s = h_{m,s}(k*_s) - h_{grpo,s}(k*_s) (reward gain at matched out-of-sample local KL). Support: Delta > 0.
* M (one minibatch): d_s = log(K_oos,proma / K_oos,grpo) at 1x. Support: ratio < 1.
* EN (entropy in X): d_s = E_m - E_against with E = ``entropy_end_ratio``. Support: d > 0.
* AC (avoids collapse in X): d_s = E_m - 1/2, one-sample. Support: mean > 0.
* CODE: d_s = log(K_oos,proma-code / K_oos,proma-paper) or E_proma-code - E_proma-paper at 1x. No direction:
  "differs (higher / lower)" when significant, else "no difference shown".

Holm's step-down over the family at :data:`ALPHA`. Nothing is decided before every hypothesis has its planned seeds
(:data:`N_SEEDS`): the verdict reads "in progress". If the pilot is over without an accepted X, the five X
hypotheses are dropped and Holm runs over the other ten.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import stats

ALPHA = 0.05
COLLAPSE_FRACTION = 0.5
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
DIFFERS_HIGHER, DIFFERS_LOWER, NO_DIFFERENCE = "differs (higher)", "differs (lower)", "no difference shown"
IN_PROGRESS, NOT_TESTED = "in progress", "not tested (no GRPO-collapse regime accepted)"
ONE_X = {"learn-240": 1e-4, "collapse": 3e-4}
N_SEEDS = {"F": 10, "M": 10, "CODE": 10, "EN": 15, "AC": 15}
X = "X"  # the placeholder regime of the X hypotheses (replaced by the accepted candidate's name)


@dataclass(frozen=True)
class Hypothesis:
    id: str
    claim: str
    kind: str            # "frontier" | "kl_ratio" | "entropy_diff" | "entropy_abs" | "code_kl" | "code_entropy"
    regime: str
    method: str
    against: str | None  # None: one-sample (AC)

    @property
    def family_tag(self) -> str:
        return self.id.split("-")[0]

    @property
    def directional(self) -> bool:
        return not self.kind.startswith("code")


def family(x_regime: str | None = X) -> tuple[Hypothesis, ...]:
    """The fifteen hypotheses of PREREGISTRATION-2.md section 5, in its order (``x_regime`` names X's runs)."""
    out = []
    for tag, method, who in (("G", "proma", "exact PROMA"), ("P", "proma-paper", "the published settings")):
        for regime, r in (("learn-240", "L"), ("collapse", "C")):
            out.append(Hypothesis(f"F-{tag}-{r}", f"{who}: more reward gain than GRPO at matched out-of-sample KL",
                                  "frontier", regime, method, "grpo"))
    for regime, r in (("learn-240-mb1", "L"), ("collapse-mb1", "C")):
        out.append(Hypothesis(f"M-G-{r}", "with one minibatch (no clipping), exact PROMA's out-of-sample KL is "
                                          "below GRPO's", "kl_ratio", regime, "proma", "grpo"))
    x = x_regime or X
    out += [Hypothesis("EN-G-X", "exact PROMA keeps more entropy than GRPO", "entropy_diff", x, "proma", "grpo"),
            Hypothesis("EN-P-X", "the published settings keep more entropy than GRPO", "entropy_diff", x,
                       "proma-paper", "grpo"),
            Hypothesis("EN-R-X", "the projection keeps entropy (exact PROMA vs REINFORCE)", "entropy_diff", x,
                       "proma", "reinforce"),
            Hypothesis("AC-G-X", "exact PROMA avoids entropy collapse (end/start above 1/2)", "entropy_abs", x,
                       "proma", None),
            Hypothesis("AC-P-X", "the published settings avoid entropy collapse", "entropy_abs", x, "proma-paper",
                       None)]
    for kind, what in (("code_kl", "out-of-sample local KL"), ("code_entropy", "entropy end/start")):
        letter = "K" if kind == "code_kl" else "E"
        for regime, r in (("learn-240", "L"), ("collapse", "C")):
            out.append(Hypothesis(f"CODE-{letter}-{r}", f"the published code differs from the published settings "
                                                        f"in {what}", kind, regime, "proma-code", "proma-paper"))
    return tuple(out)


@dataclass(frozen=True)
class Outcome:
    """A hypothesis tested: n seeds, the estimate (interval dict; ratios exponentiated), p, its per-seed values."""

    hypothesis: Hypothesis
    n: int
    estimate: dict | None
    p: float
    supports: bool               # the estimate points the way of the claim (CODE: the estimate is above 0 / 1)
    diffs: tuple = ()
    p_adj: float = float("nan")
    verdict: str = IN_PROGRESS


# ------------------------------------------------------------------------------------------------ the tests
def frontier_points(runs: dict, method: str, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(log K_oos, reward gain) at each of the method's learning rates of ``seed`` (None unless all three ran)."""
    lrs = sorted({lr for m, lr, _ in runs if m == method})
    pts = [runs.get((method, lr, seed)) for lr in lrs]
    if len(lrs) < 3 or any(p is None for p in pts):
        return None
    return np.log([p["oos_kl_mean"] for p in pts]), np.array([p["reward_gain"] for p in pts])


def line_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """The least-squares line of ``y`` on ``x`` evaluated at ``at``."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept + slope * at)


def frontier_deltas(runs: dict, method: str, against: str, *, kl: str = "oos_kl_mean") -> dict:
    """``{seed: Delta_s}``: reward gain at matched log KL (``kl``: the per-run KL column), method minus against."""
    out, runs = {}, _with_kl(runs, kl)
    for s in sorted({s for m, _, s in runs if m == method}):
        a, b = frontier_points(runs, method, s), frontier_points(runs, against, s)
        if a is None or b is None:
            continue
        k_star = float(np.mean(np.concatenate([a[0], b[0]])))
        out[s] = line_at(*a, k_star) - line_at(*b, k_star)
    return out


def _with_kl(runs: dict, kl: str) -> dict:
    if kl == "oos_kl_mean":
        return runs
    return {key: {**v, "oos_kl_mean": v[kl]} for key, v in runs.items()}


def logkl_at_matched_gain(runs: dict, method: str, against: str) -> tuple[dict, int]:
    """The issue's form (secondary): ``{seed: log K_oos,m(G*) - log K_oos,against(G*)}`` with the least-squares
    line of log K_oos on G, G* the mean of the six gains; and the number of seeds where G* lies outside either
    method's own range of gains (an extrapolation)."""
    out, outside = {}, 0
    for s in sorted({s for m, _, s in runs if m == method}):
        a, b = frontier_points(runs, method, s), frontier_points(runs, against, s)
        if a is None or b is None:
            continue
        g_star = float(np.mean(np.concatenate([a[1], b[1]])))
        out[s] = line_at(a[1], a[0], g_star) - line_at(b[1], b[0], g_star)
        outside += int(not (a[1].min() <= g_star <= a[1].max() and b[1].min() <= g_star <= b[1].max()))
    return out, outside


def paired_at(runs: dict, a: str, b: str, column: str, lr: float) -> tuple[list, np.ndarray, np.ndarray]:
    """(seeds, a's values, b's values) at learning rate ``lr`` over the seeds both ran."""
    seeds = sorted(s for m, ll, s in runs if m == a and ll == lr and (b, lr, s) in runs)
    return seeds, np.array([runs[(a, lr, s)][column] for s in seeds]), np.array([runs[(b, lr, s)][column] for s in seeds])


def _one_lr(runs: dict) -> float | None:
    lrs = sorted({lr for _, lr, _ in runs})
    return lrs[0] if len(lrs) == 1 else None


def _outcome(h: Hypothesis, d: np.ndarray, *, ratio: bool, shift: float = 0.0) -> Outcome:
    """t-test of mean(d) = 0; the estimate is the interval of d (+ ``shift``), exponentiated for ratios."""
    if d.size < 2:
        return Outcome(h, int(d.size), None, 1.0, False, tuple(d))
    iv = stats.t_interval(d)
    if ratio:
        iv = {**iv, **{k: float(np.exp(iv[k])) for k in ("mean", "lo", "hi")}}
    else:
        iv = {**iv, **{k: iv[k] + shift for k in ("mean", "lo", "hi")}}
    mean = float(d.mean())
    supports = mean < 0 if (ratio and h.directional) else mean > 0
    return Outcome(h, int(d.size), iv, stats.paired_t_p(d), bool(supports), tuple(d))


def test(h: Hypothesis, results: dict) -> Outcome:
    """Test one hypothesis on ``results = {regime: runs}`` (no Holm yet)."""
    runs = results.get(h.regime, {})
    if h.kind == "frontier":
        d = np.array(list(frontier_deltas(runs, h.method, h.against).values()))
        return _outcome(h, d, ratio=False)
    if h.kind in ("kl_ratio", "code_kl"):
        lr = ONE_X.get(h.regime.removesuffix("-mb1"))
        _, a, b = paired_at(runs, h.method, h.against, "oos_kl_mean", lr)
        return _outcome(h, np.log(a / b) if a.size else a, ratio=True)
    if h.kind in ("entropy_diff", "code_entropy"):
        lr = ONE_X.get(h.regime) if h.kind == "code_entropy" else _one_lr(runs)
        _, a, b = paired_at(runs, h.method, h.against, "entropy_end_ratio", lr)
        return _outcome(h, a - b, ratio=False)
    if h.kind == "entropy_abs":
        e = np.array([v["entropy_end_ratio"] for (m, _, _), v in sorted(runs.items()) if m == h.method])
        return _outcome(h, e - COLLAPSE_FRACTION, ratio=False, shift=COLLAPSE_FRACTION)
    raise ValueError(f"{h.id}: unknown kind {h.kind!r}")


def decide(results: dict, *, x_regime: str | None, pilot_over: bool, alpha: float = ALPHA,
           n_required: dict | None = None) -> list[Outcome]:
    """Every hypothesis tested, Holm-adjusted over the family, and decided by PREREGISTRATION-2.md section 5.

    ``x_regime``: the accepted candidate (None if none); ``pilot_over``: the pilot has finished. With the pilot
    over and no X, the X hypotheses are :data:`NOT_TESTED` and leave the family. Until every hypothesis of the
    family has its ``n_required`` seeds (default :data:`N_SEEDS` by tag), every verdict is :data:`IN_PROGRESS`.
    """
    need = N_SEEDS if n_required is None else n_required
    hyps = family(x_regime)
    dropped = {h.id for h in hyps if h.regime == X and pilot_over and x_regime is None}
    outcomes = [test(h, results) for h in hyps]
    tested = [o for o in outcomes if o.hypothesis.id not in dropped]
    adj = dict(zip([o.hypothesis.id for o in tested], stats.holm([o.p for o in tested])))
    complete = (pilot_over or x_regime is not None) and all(o.n >= need[o.hypothesis.family_tag] for o in tested)
    out = []
    for o in outcomes:
        if o.hypothesis.id in dropped:
            out.append(replace(o, verdict=NOT_TESTED))
            continue
        pa = adj[o.hypothesis.id]
        out.append(replace(o, p_adj=pa, verdict=_verdict(o, pa < alpha) if complete else IN_PROGRESS))
    return out


def _verdict(o: Outcome, significant: bool) -> str:
    """Section 5's verdict of ``o`` given whether its Holm-adjusted p is below alpha."""
    if not significant:
        return INCONCLUSIVE if o.hypothesis.directional else NO_DIFFERENCE
    if o.hypothesis.directional:
        return SUPPORTED if o.supports else CONTRADICTED
    return DIFFERS_HIGHER if o.supports else DIFFERS_LOWER


def family_size(outcomes: list[Outcome]) -> int:
    """m, the number of hypotheses Holm runs over (those not dropped with X)."""
    return sum(1 for x in outcomes if x.verdict != NOT_TESTED)


def settled(outcomes: list[Outcome], o: Outcome, *, alpha: float = ALPHA, n_required: dict | None = None) -> str | None:
    """The verdict an in-progress ``o`` will get whatever the runs still missing give, or None while it can change.

    Only for ``o`` whose own runs are complete (its ``n_required`` seeds). Holm's adjusted p of ``o`` lies between its
    p and m p for a family of m tested hypotheses, whatever the others' p (each step multiplies a p no larger than
    ``o``'s by at most m), so m p < alpha fixes the significant verdict and p >= alpha the undecided one; in between
    it depends on the rest. This reports a consequence of the rule; the verdicts stay "in progress" until it applies.
    """
    need = N_SEEDS if n_required is None else n_required
    if o.verdict != IN_PROGRESS or o.estimate is None or o.n < need[o.hypothesis.family_tag]:
        return None
    if o.p >= alpha:
        return _verdict(o, False)
    if family_size(outcomes) * o.p < alpha:
        return _verdict(o, True)
    return None


def holm_level(outcomes: list[Outcome], o: Outcome, alpha: float = ALPHA) -> float:
    """The level Holm applies to ``o`` at its rank among the tested hypotheses: alpha / (m - rank + 1)."""
    ps = sorted(x.p for x in outcomes if x.verdict != NOT_TESTED)
    return alpha / (len(ps) - ps.index(o.p))


def seeds_needed(outcomes: list[Outcome], o: Outcome, alpha: float = ALPHA) -> int | None:
    """Seeds for 80% power at ``o``'s observed effect and spread, at its Holm level (None: no effect / too many)."""
    return stats.seeds_for_power(o.diffs, holm_level(outcomes, o, alpha)) if len(o.diffs) >= 2 else None


def leave_one_out(outcomes: list[Outcome], o: Outcome, alpha: float = ALPHA) -> dict | None:
    """Leave-one-seed-out for ``o``: each subset's p recomputed, Holm re-applied with the other hypotheses' p unchanged.

    Returns ``{"subsets", "kept"}``: how many subsets keep ``o``'s verdict direction with Holm-adjusted p < alpha
    (for a decided ``o``), or None with fewer than 3 seeds.
    """
    d = np.asarray(o.diffs)
    if d.size < 3:
        return None
    others = [x.p for x in outcomes if x is not o and x.verdict != NOT_TESTED]
    kept = 0
    for k in range(d.size):
        sub = np.delete(d, k)
        p = stats.paired_t_p(sub)
        p_adj = stats.holm([p, *others])[0]
        same_side = (sub.mean() > 0) == (d.mean() > 0)
        kept += int(p_adj < alpha and same_side)
    return {"subsets": int(d.size), "kept": kept}
