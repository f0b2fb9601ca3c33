"""The second study's secondary analyses in the report (PREREGISTRATION-2.md section 7): tables and the X curves.

Computations: :mod:`verification.studies.secondary2` and :mod:`verification.studies.preregistered2`. Nothing here
decides anything; every row is a paired t-interval over the seeds both methods ran (ratios exponentiated).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..studies import preregistered2 as P2
from ..studies import secondary2 as S2
from ..studies import stats
from .markdown import p_value, table

X_FIGURE = "study2_x_curves.png"
COLUMN_WORDS = {"oos_kl_mean": "out-of-sample KL", "local_kl_mean": "in-sample KL",
                "local_kl_mb0": "in-sample KL, minibatch 0", "local_kl_mb1": "in-sample KL, minibatch 1",
                "oos_kl_mb0": "out-of-sample KL, minibatch 0", "oos_kl_mb1": "out-of-sample KL, minibatch 1",
                "reward_gain": "reward gain", "entropy_end_ratio": "entropy end/start"}



def _contrast(c: S2.Contrast | None) -> str:
    if c is None:
        return "-"
    fmt = ".3f" if c.kind == "ratio" else "+.4f"
    return f"{stats.format_interval(c.interval, fmt)} (p {p_value(c.p)})"


def per_rate_table(results: dict) -> list:
    contrasts = S2.per_rate(results)
    if not contrasts:
        return []
    index = {(c.regime, c.lr, c.method, c.column): c for c in contrasts}
    rows = []
    for regime, lr, m in sorted({(c.regime, c.lr, c.method) for c in contrasts}):
        cells = [index.get((regime, lr, m, col)) for col, _, _ in S2.PER_RATE_COLUMNS]
        n = max(c.interval["n"] for c in cells if c is not None)
        rows.append((regime, f"{lr:g}", m, n, *[_contrast(c) for c in cells]))
    headers = ["regime", "lr", "method", "seeds", *[label for _, _, label in S2.PER_RATE_COLUMNS]]
    return ["At each learning rate, against GRPO (paired by seed; a ratio is the geometric mean over seeds of the "
            "per-seed ratio of the two runs' mean KL; p unadjusted):", "",
            table(headers, rows), ""]


def contrast_rows(contrasts: list) -> list:
    return [(c.regime, c.method, c.against, COLUMN_WORDS.get(c.column, c.column), c.interval["n"], _contrast(c))
            for c in contrasts]


def minibatch_table(results: dict) -> list:
    rows = contrast_rows(S2.minibatch_contrasts(results))
    if not rows:
        return []
    return ["Minibatches at 1x: `-mb1` is one minibatch per rollout (no clipping); the plain regime has two, shown "
            "on minibatch 0 (on-policy) and minibatch 1 (where GRPO's clipping acts) separately:", "",
            table(["regime", "method", "against", "endpoint", "seeds", "ratio [95% CI] (p)"], rows), ""]


def code_table(results: dict) -> list:
    rows = contrast_rows(S2.code_contrasts(results))
    if not rows:
        return []
    return ["The published code against the published settings at 1x (the endpoints the CODE hypotheses do not "
            "test):", "", table(["regime", "method", "against", "endpoint", "seeds", "estimate [95% CI] (p)"],
                                rows), ""]


def x_tables(study: dict) -> list:
    """Every method's absolute entropy rule, both KLs and reward gain in X; GRPO's regime conditions there."""
    x = study.get("x")
    runs = study["results"].get(x, {}) if x else {}
    summary = S2.x_summary(runs, seeds=study.get("x_seeds"))
    if not summary:
        return []
    fmt = lambda row, key, f=".3f": stats.format_interval(row[key], f) if key in row else "-"  # noqa: E731
    rows = [(r["method"], r["n"], fmt(r, "entropy"), r["rule"], fmt(r, "oos_kl", ".2e"), fmt(r, "local_kl", ".2e"),
             fmt(r, "reward_gain", "+.3f")) for r in summary]
    lines = [f"In X (`{x}`; the pilot's seeds left out), each method over its seeds (95% t-intervals; KLs: geometric "
             "means; the absolute rule: end/start below 1/2 = collapse):", "",
             table(["method", "seeds", "entropy end/start", "absolute rule", "out-of-sample KL", "in-sample KL",
                    "reward gain"], rows), ""]
    cond = S2.x_conditions(runs, seeds=study.get("x_seeds"))
    if cond:
        lines += [table(["GRPO's condition in X", "evidence", "verdict"], cond), ""]
    if study.get("x_curves"):
        lines += [f"![X curves]({X_FIGURE})", ""]
    return lines


def reproduction_lines(study: dict) -> list:
    rep = study.get("reproduction") or []
    if not rep:
        return ["Reproduction check (GRPO at 1x, seeds 5-9, against the first study's runs): no run of those seeds "
                "yet.", ""]
    parts = [f"`{r['regime']}` seeds {', '.join(map(str, r['seeds']))}: largest difference of any training record "
             f"{r['max_diff']:.3g} (in `{r['field']}`), of the final accuracy {r['val_diff']:.3g}" for r in rep]
    return ["Reproduction check (GRPO at 1x, seeds 5-9, same warm-start, prompts and samples as the first study; "
            "wall times and the out-of-sample probe apart): " + "; ".join(parts) + ". Not expected to be 0: the "
            "first study's own code differs from its records at float32 rounding on this study's machine "
            "(PREREGISTRATION-2.md, record 2), and sampling amplifies it.", ""]


def x_curves_plot(curves: dict, path, seeds=None) -> Path:
    """X: seed-mean entropy end/start and rollout reward per rollout step, one line per method, 95% t-bands."""
    from .plots import _color, _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    methods = sorted({m for m, _, _ in curves})
    for ax, key, label in ((axes[0], "entropy", "token entropy / first step's"), (axes[1], "reward", "rollout reward")):
        for m in methods:
            runs = [c[key] for (mm, _, s), c in sorted(curves.items()) if mm == m and (seeds is None or s in seeds)]
            if len(runs) < S2.MIN_SEEDS or len({r.size for r in runs}) != 1:
                continue
            band = S2.seed_band(runs)
            steps = np.arange(1, band["mean"].size + 1)
            ax.plot(steps, band["mean"], color=_color(m), label=f"{m} ({len(runs)} seeds)")
            ax.fill_between(steps, band["lo"], band["hi"], color=_color(m), alpha=0.2)
        if key == "entropy":
            ax.axhline(P2.COLLAPSE_FRACTION, color="black", lw=0.8, ls="--")
        ax.set_xlabel("rollout step")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("GRPO-collapse regime X: seed means with pointwise 95% t-bands", fontsize=9)
    return _save(fig, path)


def section(study: dict, outcomes: list) -> list:
    """PREREGISTRATION-2.md section 7 as far as the data go (decides nothing)."""
    results = study["results"]
    lines = ["Secondary (decides nothing): the frontier with in-sample KL, the issue's form (log out-of-sample KL "
             "at matched reward gain, with the seeds where the matched gain lies outside a method's own range), "
             "the out-of-sample / in-sample KL ratio per method at 1x, each learning rate's contrasts, the "
             "minibatch contrasts, X's per-method numbers, the published code's other endpoints, leave-one-seed-out "
             "under Holm, and the reproduction check.", ""]
    lines += frontier_forms(results) + oos_over_in(results) + per_rate_table(results) + minibatch_table(results)
    lines += x_tables(study) + code_table(results) + leave_one_out_table(outcomes) + reproduction_lines(study)
    return lines


def frontier_forms(results: dict) -> list:
    rows = []
    for regime in ("learn-240", "collapse"):
        runs = results.get(regime, {})
        for m in ("proma", "proma-paper"):
            ins = list(P2.frontier_deltas(runs, m, "grpo", kl="local_kl_mean").values())
            form, outside = P2.logkl_at_matched_gain(runs, m, "grpo")
            vals = np.array(list(form.values()))
            rows.append((regime, m, stats.format_interval(stats.t_interval(ins), "+.4f") if len(ins) > 1 else "-",
                         (stats.format_interval(S2.geometric_interval(np.exp(vals)), ".3g") if vals.size > 1 else "-")
                         + f" ({outside} of {vals.size} extrapolated)"))
    return [table(["regime", "method", "gain at matched in-sample KL (vs grpo)",
                   "out-of-sample KL ratio at matched gain (vs grpo)"], rows), ""]


def oos_over_in(results: dict) -> list:
    rows = []
    for regime, lr in P2.ONE_X.items():
        runs = results.get(regime, {})
        for m in ("grpo", "proma", "proma-paper", "proma-code"):
            seeds = [s for mm, ll, s in runs if mm == m and ll == lr]
            if len(seeds) > 1:
                r = [runs[(m, lr, s)]["oos_kl_mean"] / runs[(m, lr, s)]["local_kl_mean"] for s in seeds]
                rows.append((regime, m, len(seeds), stats.format_interval(S2.geometric_interval(r), ".3f")))
    if not rows:
        return []
    return ["Out-of-sample over in-sample local KL at 1x (geometric mean over seeds):", "",
            table(["regime", "method", "seeds", "oos / in-sample"], rows), ""]


def leave_one_out_table(outcomes: list) -> list:
    rows = []
    for o in outcomes:
        loo = P2.leave_one_out(outcomes, o)
        w = stats.wilcoxon_p(o.diffs) if len(o.diffs) >= 2 else None
        if loo:
            rows.append((o.hypothesis.id, f"{loo['kept']}/{loo['subsets']}", "-" if w is None else p_value(w)))
    if not rows:
        return []
    return ["Leave-one-seed-out (subsets whose Holm-adjusted p stays below 0.05 on the same side, the other "
            "hypotheses' p unchanged) and the Wilcoxon signed-rank p:", "",
            table(["id", "kept under Holm", "Wilcoxon p"], rows), ""]
