"""The second study's part of the report: its results loaded, its figures, and its section's text.

Rules: ``reports/PREREGISTRATION-2.md``; tests and verdicts: :mod:`verification.studies.preregistered2`; cells, pilot
and run order: :mod:`verification.studies.study2`. Nothing here decides anything the pre-registration does not.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..studies import preregistered2 as P2
from ..studies import secondary2 as S2
from ..studies import stats, study2, tables
from . import study2_secondary
from .markdown import p_value, table

PREREG2_COMMIT = "30fc60d"   # the commit that added PREREGISTRATION-2.md, before any run of the second study
FIGURES = {"forest": "study2_forest.png", "frontier": "study2_frontier.png", "curves": "study2_curves.png"}
CURVE_METHODS = ("grpo", "proma", "proma-paper", "proma-code")  # the 1x cells of learn-240 and collapse
KIND_WORDS = {"frontier": ("reward-gain difference at matched KL", "+.4f"), "kl_ratio": ("ratio", ".3f"),
              "code_kl": ("ratio", ".3f"), "entropy_diff": ("paired difference", "+.3f"),
              "code_entropy": ("paired difference", "+.3f"), "entropy_abs": ("end/start", ".3f")}


def load_study2(data_dir, first_dir=None) -> dict | None:
    """``{"results", "x", "x_seeds", "x_curves", "reproduction", "pilot_over", "pilot", "run_seconds",
    "hours_left", "runs", "planned", "commits", "data_dir"}`` from the study's data folder, or None when it holds no run.

    ``first_dir``: the first study's data (default: ``data_dir``'s sibling ``seeds``), for the reproduction check."""
    data_dir = Path(data_dir)
    first_dir = data_dir.parent / "seeds" if first_dir is None else Path(first_dir)
    files = sorted(data_dir.glob("*/*-lr*-s*.json"))
    if not files:
        return None
    regimes = sorted({f.parent.name for f in files})
    results = {r: tables.load_results(data_dir, r) for r in regimes}
    accepted, nxt, seen = study2.pilot_state(data_dir)
    commits, seconds = {}, 0.0
    for f in files:  # each file read once here for its commit and its cost
        res = json.loads(f.read_text())
        code = res.get("code", {})
        key = (code.get("commit") or "none")[:7] + (" (dirty)" if code.get("dirty") else "")
        commits[key] = commits.get(key, 0) + 1
        seconds += tables.run_wall_seconds(res)
    planned = sum(len(g.runs()) for g in study2.cells(data_dir).values())
    pilot_names = {name for name, _, _ in study2.CANDIDATES} - ({accepted} if accepted else set())
    pilot_runs = tuple(f"-s{seed}" for seed in study2.PILOT_SEEDS)  # the accepted candidate's pilot runs too
    done = sum(1 for f in files if f.parent.name not in pilot_names and not f.stem.endswith(pilot_runs))
    return {"results": results, "x": accepted, "x_seeds": study2.X_SEEDS, "pilot_over": nxt is None, "pilot": seen,
            "x_curves": S2.rollout_curves(data_dir, accepted) if accepted else {},
            "reproduction": S2.reproduction(data_dir, first_dir) if first_dir.is_dir() else [],
            "run_seconds": seconds, "hours_left": study2.hours_left(data_dir),
            "runs": done, "planned": planned, "commits": commits, "data_dir": data_dir}



def _estimate(o: P2.Outcome) -> str:
    if o.estimate is None:
        return f"waiting ({o.n} of {P2.N_SEEDS[o.hypothesis.family_tag]} seeds)"
    word, fmt = KIND_WORDS[o.hypothesis.kind]
    return f"{word} {stats.format_interval(o.estimate, fmt)}"


def verdict_table(outcomes: list) -> str:
    def ps(o):  # no p before an interval exists (one seed); Holm's only once it has been applied
        if o.estimate is None:
            return "-", "-"
        return p_value(o.p), "-" if o.p_adj != o.p_adj else p_value(o.p_adj)

    rows = [(o.hypothesis.id, o.hypothesis.claim, o.hypothesis.regime, o.n, _estimate(o), *ps(o), f"**{o.verdict}**")
            for o in outcomes]
    return table(["id", "claim", "regime", "seeds", "estimate [95% CI]", "p", "Holm p", "verdict"], rows)


# ---------------------------------------------------------------------------------------------- figures
def forest_plot(outcomes: list, path) -> Path:
    """One panel per scale (reward gain at matched KL; KL ratios; entropy), each hypothesis' estimate and 95% CI."""
    from .plots import _save, forest_panel, plt

    panels = (("reward gain at matched out-of-sample KL (method - GRPO)", ("frontier",), 0.0),
              ("out-of-sample local KL ratio", ("kl_ratio", "code_kl"), 1.0),
              ("entropy end/start (difference; AC: level vs 1/2)", ("entropy_diff", "code_entropy", "entropy_abs"), 0.0))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, kinds, ref) in zip(axes, panels):
        items = []
        for o in outcomes:
            if o.hypothesis.kind not in kinds or o.estimate is None:
                continue
            shift = 0.5 if o.hypothesis.kind == "entropy_abs" else 0.0  # AC: drawn as a difference from 1/2
            color = "tab:green" if o.verdict in (P2.SUPPORTED,) else "tab:red" if o.verdict == P2.CONTRADICTED else \
                "tab:purple" if o.verdict.startswith("differs") else "tab:gray"
            items.append((f"{o.hypothesis.id} ({o.n})", *(o.estimate[k] - shift for k in ("mean", "lo", "hi")), color))
        forest_panel(ax, items, ref=ref, log=ref == 1.0, title=title)
    fig.suptitle("Second study: estimates with unadjusted 95% t-intervals (green supported, red contradicted, "
                 "purple differs, grey undecided / in progress)", fontsize=9)
    return _save(fig, path)


def frontier_plot(results: dict, path) -> Path:
    """Seed means of (log out-of-sample KL, reward gain) per method and learning rate, with 95% t-intervals."""
    from .plots import _color, _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, regime in zip(axes, ("learn-240", "collapse")):
        runs = results.get(regime, {})
        for m in study2.FRONTIER_METHODS:
            pts = []
            for lr in study2.RATES[regime]:
                seeds = [s for mm, ll, s in runs if mm == m and ll == lr]
                if len(seeds) < 2:
                    continue
                k = stats.t_interval(np.log([runs[(m, lr, s)]["oos_kl_mean"] for s in seeds]))
                g = stats.t_interval([runs[(m, lr, s)]["reward_gain"] for s in seeds])
                pts.append((k, g))
                ax.errorbar(k["mean"], g["mean"], xerr=[[k["mean"] - k["lo"]], [k["hi"] - k["mean"]]],
                            yerr=[[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]], fmt="o", color=_color(m), capsize=2)
            if pts:
                ax.plot([k["mean"] for k, _ in pts], [g["mean"] for _, g in pts], color=_color(m), label=m)
        ax.set_xlabel("log out-of-sample local KL (mean over steps)")
        ax.set_ylabel("reward gain")
        ax.set_title(f"{regime}: 0.5x, 1x, 2x learning rate (left to right)", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def figures(study: dict, out) -> dict:
    """Write the study's PNGs into ``out``: ``{key: path}``."""
    outcomes = P2.decide(study["results"], x_regime=study["x"], pilot_over=study["pilot_over"])
    out = Path(out)
    figs = {"study2_forest": forest_plot(outcomes, out / FIGURES["forest"]),
            "study2_frontier": frontier_plot(study["results"], out / FIGURES["frontier"])}
    if study.get("data_dir") is not None:
        figs["study2_curves"] = curves_1x_plot(study["data_dir"], out / FIGURES["curves"])
    if study.get("x_curves"):
        figs["study2_x_curves"] = study2_secondary.x_curves_plot(study["x_curves"], out / study2_secondary.X_FIGURE,
                                                                 seeds=study.get("x_seeds"))
    return figs


def curves_1x_plot(data_dir, path) -> Path:
    """learn-240 and collapse at 1x: out-of-sample local KL, entropy and reward per step, seed means with 95% bands."""
    from . import seed_figures as F

    regimes = tuple(P2.ONE_X)
    curves = F.load_curves(data_dir, regimes, kl_key="oos_local_kl", lrs=P2.ONE_X)
    return F.curves_plot(curves, path, regimes=regimes, methods=CURVE_METHODS, kl_key="oos_local_kl",
                         kl_label="out-of-sample local KL per token (geometric mean)",
                         title="Second study at 1x: mean over seeds with pointwise 95% t-bands (number of seeds in "
                               "the legend); each run smoothed by a trailing moving average first")


# ---------------------------------------------------------------------------------------------- text
def budget_line(study: dict) -> str:
    """The cost so far and left against section 6's budget, and what its overrun rule does."""
    done = study["run_seconds"] / 3600
    mean, fastest = study.get("hours_left", (0.0, None))
    limit = study2.BUDGET_WORKER_HOURS * (1 + study2.BUDGET_OVERRUN)
    over = done + mean > limit
    if mean > 0:
        cost = f"Cost: {done:.1f} worker-hours so far, about {mean:.1f} left at the done runs' mean pace" + (
            f" ({fastest:.1f} at each cell's fastest run's pace; runs that shared their core took longer)"
            if fastest is not None else "")
        total = f"the projected {done + mean:.1f}"
    else:
        cost, total = f"Cost: {done:.1f} worker-hours, every planned run done", f"the total {done:.1f}"
    rule = (f"{total} exceeds it by more than {study2.BUDGET_OVERRUN:.0%}, so by that section's rule the frontier "
            "cells keep 10 seeds and nothing else is cut (no amendment)" if over else
            f"{total} is within {study2.BUDGET_OVERRUN:.0%} of it")
    return (f"{cost}; section 6 budgeted about {study2.BUDGET_WORKER_HOURS:.0f} worker-hours, and {rule}. For that "
            "budget issue 32's item 6 (completions of about 24 tokens) was dropped before any run (section 1); its "
            "task, `gsm8k-chain`, exists but is not piloted.")


def power_lines(outcomes: list) -> list:
    """One line per undecided hypothesis: the seeds that give a paired t-test 80% power at its observed effect and
    spread, at the level Holm applies to it (P2.holm_level), and the side that effect lies on."""
    out = []
    for o in outcomes:
        if o.verdict not in (P2.INCONCLUSIVE, P2.NO_DIFFERENCE) or o.estimate is None:
            continue
        n = P2.seeds_needed(outcomes, o)
        need = (f"about {n} seeds ({o.n} now)" if n else f"more than {stats.MAX_POWER_SEEDS:,} seeds ({o.n} now; the "
                "observed effect is near 0 against its spread)")
        if o.hypothesis.directional:
            side = "for the claim" if o.supports else "against the claim"
        else:
            side = "higher" if o.supports else "lower"
        out.append(f"- {o.hypothesis.id}: {need}, to decide it on the observed side ({side}) at its "
                   f"Holm level {P2.holm_level(outcomes, o):.3g}.")
    return out


def settled_lines(outcomes: list) -> list:
    """A line naming the in-progress hypotheses whose verdict the missing runs can no longer change (P2.settled)."""
    fixed = [(o, P2.settled(outcomes, o)) for o in outcomes]
    fixed = [(o, v) for o, v in fixed if v is not None]
    if not fixed:
        return []
    m = P2.family_size(outcomes)
    names = "; ".join(f"{o.hypothesis.id} {v} (p {p_value(o.p)})" for o, v in fixed)
    return [f"Fixed already, though declared only when the family completes: these hypotheses have all their runs, "
            f"and Holm's adjusted p lies between p and {m} p whatever the runs still missing give, so p below "
            f"{P2.ALPHA / m:.2g} fixes a significant verdict (supported or contradicted; for CODE, differs) and p of "
            f"{P2.ALPHA} or more the undecided one: {names}.", ""]


def section(study: dict | None) -> list:
    """The report's section on the second study (rules, state, verdicts, power, pilot, secondary)."""
    if study is None:
        return ["The second study (`PREREGISTRATION-2.md`) has no run yet.", ""]
    outcomes = P2.decide(study["results"], x_regime=study["x"], pilot_over=study["pilot_over"])
    commits = ", ".join(f"`{c}` ({n})" for c, n in sorted(study["commits"].items()))
    lines = [f"Rules: [`PREREGISTRATION-2.md`](PREREGISTRATION-2.md), committed in `{PREREG2_COMMIT}` before any "
             "run of this study (its pilot included); every run's JSON records the commit it ran "
             f"(here: {commits}). Fifteen hypotheses, two-sided t-tests over seeds (paired by seed), Holm across "
             "the family at alpha 0.05. Every run logs the out-of-sample local KL: the exact KL between the "
             "policies before and after each optimizer step on fresh completions of 32 held-out (test-split) "
             "prompts sampled from the policy before the step.", "",
             f"Runs: {study['runs']} of {study['planned']} planned (the pilot's apart). " + budget_line(study), ""]
    pilot = "; ".join(f"`{n}`: GRPO entropy end/start {stats.format_interval(iv)}" if iv else f"`{n}`: not run"
                      for n, iv in study["pilot"])
    state = (f"accepted `{study['x']}`" if study["x"] else
             "no candidate accepted (the X hypotheses are not tested)" if study["pilot_over"] else "in progress")
    lines += [f"Pilot for the GRPO-collapse regime X (seeds 100-104, rule: the interval lies below 1/2): {pilot}; "
              f"{state}.", ""]
    if any(o.verdict == P2.IN_PROGRESS for o in outcomes):
        lines += ["**In progress**: nothing is decided until every hypothesis has its planned seeds (10; 15 in X); "
                  "the numbers below are interim.", ""]
        lines += settled_lines(outcomes)
    lines += [verdict_table(outcomes), "", f"![forest plot]({FIGURES['forest']})", ""]
    power = power_lines(outcomes)
    if power:
        lines += ["Seeds that would decide each undecided hypothesis (paired t, 80% power at the observed effect and "
                  "spread):", "", *power, ""]
    lines += [f"![frontier]({FIGURES['frontier']})", ""]
    if study.get("data_dir") is not None:
        lines += ["Out-of-sample local KL, entropy and reward over the run at 1x, mean over the seeds done with 95% "
                  "bands:", "", f"![1x curves]({FIGURES['curves']})", ""]
    lines += study2_secondary.section(study, outcomes)
    return lines
