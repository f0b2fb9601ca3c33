"""The report's seed-study text: the pre-registered verdicts (first), the seed tables and the secondary analyses.

Renderers take the report's :class:`verification.report.inputs.ReportInputs` (``r``) and return markdown lines.
The rules are ``reports/PREREGISTRATION.md``'s, implemented in :mod:`verification.studies.preregistered`; the
analyses that decide nothing are :mod:`verification.studies.secondary`'s.
"""
from __future__ import annotations

from ..studies import claims, secondary, stats
from ..studies import preregistered as P
from .seed_evidence import DEFAULT_JOBS as SEED_STUDY_JOBS
from . import seed_figures
from .markdown import f, p_value, table

PREREG = "reports/PREREGISTRATION.md"
ABSOLUTE_COLLAPSE = claims.COLLAPSE_FRACTION


def _own_warmstarts(warmstarts: dict, grid_steps: int) -> list[tuple[list, dict]]:
    """The regimes' own warm-starts (another step count than the report grid's, whose training is in the report's
    timings), once per warm-start key: ``[(regimes sharing it, its record)]``; of several records of one key (the
    same training, repeated) the shortest, the cost of training it once."""
    by_key: dict = {}
    for regime, w in sorted(warmstarts.items()):
        if w["steps"] == grid_steps:
            continue
        regimes, best = by_key.get(w.get("key", regime), ([], w))
        by_key[w.get("key", regime)] = (regimes + [regime], min(best, w, key=lambda x: x["seconds"]))
    return list(by_key.values())


def resumed_seed_study(meta, seeds) -> str:
    """The cost of seed runs this report found already done in ``data/seeds`` (a resumed study), or ``""``."""
    if not seeds or not seeds.get("run_seconds"):
        return ""
    spent = meta["timings_s"].get("seed_study", 0.0)
    jobs = SEED_STUDY_JOBS
    if spent >= seeds["run_seconds"] / jobs / 2:
        return ""
    own = _own_warmstarts(seeds.get("warmstarts", {}), meta["harness_config"]["warmstart_steps"])
    warm_s = sum(w["seconds"] for _, w in own)
    warm_txt = "".join(f", plus {w['seconds'] / 60:.0f} min to train the {w['steps']}-step warm-start of "
                       + ", ".join(f"`{r}`" for r in regimes) for regimes, w in own)
    total = sum(meta["timings_s"].values()) - spent + seeds["run_seconds"] / jobs + warm_s
    done = sum(len(runs) for runs in seeds.get("results", {}).values())
    planned = len(seeds["grid"].runs()) if seeds.get("grid") else done
    which = f" the {done} of {planned} planned runs done so far" if done < planned else " they"
    left = [row.minutes_left for row in seeds.get("plan", []) if row.minutes_left is not None]
    rest = (f" The other {planned - done} planned runs are estimated at {sum(left) / 60:.1f} more worker-hours "
            "from the done runs' times (`python -m verification.studies.seeds --plan`)." if done < planned and left else "")
    return (f" The seed study's runs were already in `data/seeds` (a resumed study; its {spent / 60:.1f} min here "
            f"only loaded them); run from scratch{which} take {seeds['run_seconds'] / 60:.0f} worker-minutes, about "
            f"{seeds['run_seconds'] / 60 / jobs:.0f} min on {jobs} workers{warm_txt}, so the whole report takes "
            f"about {total / 60:.0f} min ({total / 3600:.1f} h).{rest}")




def seed_tables(r) -> list:
    from ..studies.tables import MIN_EQUAL_KL_STEPS, markdown_equal_kl, markdown_tables, markdown_validation_per_seed

    if not r.seeds:
        return ["The seed study did not run.", ""]
    grid, mode = r.seeds["grid"], r.meta["mode"]
    scored = ("the whole test split" if grid.eval_items is None
              else f"the first {grid.eval_items} items of a fixed shuffle of the test split")
    lines = [f"Methods {', '.join(grid.methods)}; seeds {', '.join(map(str, grid.seeds))}; preset `{grid.preset}`. "
             "Every run of a seed starts from the same warm-start as every other method's run of that seed and sees "
             "the same prompts, so comparisons to GRPO are paired by seed. Final validation: greedy exact match on "
             f"{scored}. Raw per-run JSON: `data/seeds/<regime>/` "
             "(`start_eval*.json`: each warm-start on the same items; `warmstart.json`: a training record)."]
    if r.seeds.get("run_seconds"):
        lines.append(f"Cost: the runs took {r.seeds['run_seconds'] / 60:.1f} minutes of one single-threaded worker "
                     f"each in total (training and whole-split evaluation), i.e. about "
                     f"{r.seeds['run_seconds'] / 60 / SEED_STUDY_JOBS:.0f} minutes of wall time on "
                     f"{SEED_STUDY_JOBS} cores with {SEED_STUDY_JOBS} workers.")
    if mode == "full":
        lines.append("How the regimes were chosen from GRPO-only pilots, and the 80-step version of the learn regime "
                     "that the 240-step one replaced (GRPO did not demonstrably learn in 80 steps; its runs are kept "
                     "in `data/seeds/learn-80/`): `PILOT.md` sections 4-6. The 240-step horizon was chosen after "
                     "GRPO's and exact PROMA's 240-step runs of seeds 0-4 (see the verdict section). Seeds 0-4 of "
                     "`learn-240` and `collapse` start from the first study's warm-starts, seeds 5-14 from retrained "
                     "ones (pre-registration amendment 1); each regime's header names its warm-starts.")
    else:
        lines.append(f"{mode} mode: {len(grid.seeds)} seeds and a few rollout steps; the intervals show the code "
                     "path, not evidence, and no verdict is issued.")
    lines.append("")
    for regime, tab in r.seeds["tables"].items():
        over = ", ".join(f"{k}={v}" for k, v in grid.regimes[regime].items())
        lrs = ", ".join(f"{lr:g}" for lr in grid.lrs[regime])
        start_txt = "".join(f"; warm-start validation {f(w['accuracy'])} ± {f(w['se'])} on {w['n']} items "
                            f"(`{w['file']}`, seeds {_seed_list(w['seeds'])})"
                            for w in r.seeds.get("start", {}).get(regime, []))
        lines += [f"**Regime `{regime}`** ({over}; lr {lrs}{start_txt}):", ""]
        lines += [markdown_tables(tab) if tab else "No finished run.", ""]
        if tab:
            lines += ["Final greedy validation per seed (accuracy ± binomial standard error sqrt(p(1-p)/n) over the "
                      "n scored test items):", "", markdown_validation_per_seed(r.seeds["results"][regime]), ""]
        eq = r.seeds.get("equal_kl", {}).get(regime)
        if eq:
            lines += [f"Reward gain at equal cumulative local KL (per seed: budget = the smaller of the two runs' "
                      f"final cumulative local KL; each run's gain, last quarter minus first quarter, over its "
                      f"rollout steps up to the first one whose cumulative KL reaches the budget, at least "
                      f"{MIN_EQUAL_KL_STEPS}; 95% t-intervals over seeds, difference paired by seed):", "",
                      markdown_equal_kl(eq), ""]
    return lines


def _seed_list(seeds: list) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``; ``"none yet"`` for an empty list."""
    if not seeds:
        return "none yet"
    groups = [[seeds[0]]]
    for seed in seeds[1:]:
        if seed == groups[-1][-1] + 1:
            groups[-1].append(seed)
        else:
            groups.append([seed])
    return ", ".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def seed_headline(r) -> list:
    """Headline numbers of the seed study, each with its 95% interval over seeds (section 5 has them all)."""
    from ..studies.claims import JUDGED_MODES
    from ..studies.stats import format_interval as fi

    lines = []
    for regime, tab in (r.seeds or {}).get("tables", {}).items():
        if not tab:
            continue
        lr_rows = {}
        for (m, lr), row in tab.items():
            lr_rows.setdefault(lr, {})[m] = row
        for lr, rows in lr_rows.items():
            counts = [row["n_seeds"] for row in rows.values()]
            # a study in progress has fewer seeds for some methods: name the range
            n = f"{min(counts)}-{max(counts)}" if min(counts) < max(counts) else f"{max(counts)}"
            ratios = ", ".join(f"{m} {fi(row['ratio_local_kl'])}" for m, row in rows.items()
                               if row.get("ratio_local_kl"))
            vals = ", ".join(f"{m} {fi(row['columns']['val_final'])}" for m, row in rows.items())
            gains = ", ".join(f"{m} {fi(row['columns']['reward_gain'], '+.3f')}" for m, row in rows.items())
            note = "" if r.meta["mode"] in JUDGED_MODES else f"; {r.meta['mode']} mode: the code path, not evidence"
            lines.append(f"- Seed study, regime `{regime}`, lr {lr:g} ({n} seeds; 95% t-intervals{note}; section 5): "
                         f"mean local KL as a ratio to GRPO's, paired by seed: {ratios or 'n/a'}; final greedy "
                         f"validation: {vals}; reward gain: {gains}.")
    return lines




# --------------------------------------------------------------------------- the pre-registered verdicts
PREREG_COMMIT = "3538866"   # the commit that added PREREGISTRATION.md, before any run of seeds 5-14
FORMATS = {"kl": ".3f", "entropy": "+.3f", "val": "+.4f"}
KIND_WORDS = {"kl": "ratio", "entropy": "paired difference", "val": "paired difference"}


def _estimate(o: P.Outcome) -> str:
    if o.estimate is None:
        return f"{o.n} paired seeds"
    text = f"{KIND_WORDS[o.hypothesis.kind]} {stats.format_interval(o.estimate, FORMATS[o.hypothesis.kind])}"
    return f"{text} (binding: vs {o.binding})" if o.binding else text


def verdict_table(outcomes: list[P.Outcome]) -> str:
    """| id | claim | regime | seeds | estimate [95% CI] | p | Holm p | verdict | (markdown)."""
    rows = [(o.hypothesis.id, o.hypothesis.claim, o.hypothesis.regime, o.n, _estimate(o), p_value(o.p), p_value(o.p_adj),
             f"**{o.verdict}**") for o in outcomes]
    return table(["id", "claim", "regime", "seeds", "estimate [95% CI]", "p", "Holm p", "verdict"], rows)


def power_lines(outcomes: list[P.Outcome]) -> list:
    """One line per undecided hypothesis: seeds for 80% power at its observed effect and its Holm level."""
    out = []
    for o in outcomes:
        if o.verdict in (P.SUPPORTED, P.CONTRADICTED) or o.estimate is None:
            continue
        n = P.seeds_needed(outcomes, o)
        level = P.holm_level(outcomes, o)
        side = "for" if o.supports else "against"
        need = (f"about {n} seeds would give 80% power to decide it ({side} the claim, the observed side)" if n
                else "no number of seeds would decide it in the claim's favour at this effect")
        out.append(f"- {o.hypothesis.id}: at the observed effect and spread ({o.n} seeds), {need} at its Holm "
                   f"level {level:.3g}.")
    return out


def entropy_sentences(outcomes: list[P.Outcome], results: dict) -> list:
    """Each entropy hypothesis in words, the paired endpoint and the absolute rule side by side."""
    out = []
    for o in outcomes:
        h = o.hypothesis
        if h.kind != "entropy" or o.estimate is None:
            continue
        runs = results.get(h.regime, {})
        base, mine = claims.absolute_entropy(runs, "grpo"), claims.absolute_entropy(runs, h.method)
        more = "more" if o.estimate["mean"] > 0 else "less"
        line = (f"- {h.id} ({h.regime}): {h.method} on average keeps {more} entropy than GRPO (end/start ratio, paired "
                f"{stats.format_interval(o.estimate, '+.3f')}, Holm p {p_value(o.p_adj)}: {o.verdict})")
        if base and mine:
            line += (f"; by the absolute rule (end/start below {ABSOLUTE_COLLAPSE:g} = collapse) GRPO "
                     f"{base[1]} ({stats.format_interval(base[0])}) and {h.method} {mine[1]} "
                     f"({stats.format_interval(mine[0])})")
        out.append(line + ".")
    return out


def commit_lines(commits: dict) -> list:
    """Which runs record the commit they ran (and which ran before that was recorded), and the pooling statement
    of the pre-registration's amendment 2."""
    if not commits:
        return []
    total = sum(len(c) for c in commits.values())
    recorded = sum(v is not None for c in commits.values() for v in c.values())
    missing = []
    for regime, runs in commits.items():
        seeds = sorted({s for (_, s), v in runs.items() if v is None})
        if seeds:
            missing.append(f"`{regime}` seeds {_seed_list(seeds)}")
    distinct = sorted({v[:7] for c in commits.values() for v in c.values() if v})
    text = (f"Code versions: {recorded} of {total} runs record the commit they ran ({', '.join(f'`{c}`' for c in distinct)})"
            + (f"; {', '.join(missing)} ran before runs recorded their commit (the first study's code of "
               "2026-11-28, NumPy solves)" if missing else "") + ". As amendment 2 of the pre-registration states, "
            "seeds 0-4 (NumPy solves) and 5-14 (torch solves) are pooled as the same algorithm, not as identical "
            "computations (the two codes agree bit for bit for the first 157 optimizer steps of the same run, then "
            "diverge by rounding amplified by sampling); the secondary \"seeds 5-14 alone\" row is the "
            "one-code-version analysis.")
    return [text, ""]


def verdicts_section(r) -> list:
    """The report's first section: the pre-registered verdict table, power, entropy in words, the conditions."""
    if not r.seeds:
        return ["No verdict: the seed study did not run.", ""]
    results, full = r.seeds["results"], r.meta["mode"] in claims.JUDGED_MODES
    lines = [f"Rules: [`PREREGISTRATION.md`](PREREGISTRATION.md), committed in `{PREREG_COMMIT}` before any run of "
             f"seeds {P.NEW_SEEDS[0]}-{P.NEW_SEEDS[-1]}. Eleven "
             f"hypotheses, two-sided paired t-tests over seeds, Holm across all eleven at family-wise "
             f"alpha {P.ALPHA}; estimates with unadjusted 95% t-intervals, paired by seed.", ""]
    lines += commit_lines(r.seeds.get("commits") or {})
    if not full:
        return lines + [f"{r.meta['mode']} mode: no verdict (the family's regimes are the full study's).", ""]
    outcomes = P.decide(results)
    counts = sorted({o.n for o in outcomes})
    if any(o.verdict == P.IN_PROGRESS for o in outcomes):
        have = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"
        lines += [f"**In progress**: comparisons have {have} of the {P.N_SEEDS} pre-registered "
                  "seeds; the numbers are shown, nothing is decided until every comparison has all of them.", ""]
    lines += [verdict_table(outcomes), "", f"![forest plot of the verdicts]({seed_figures.FIGURES['forest']})", ""]
    power = power_lines(outcomes)
    if power:
        lines += ["Seeds that would decide each undecided hypothesis (paired t, 80% power):", ""] + power + [""]
    lines += ["Entropy, both readings (the paired endpoint decides; the absolute rule is printed beside it):", ""]
    lines += entropy_sentences(outcomes, results) + [""]
    lines += ["Local KL, entropy and reward over the run in the family's three regimes, mean over the 15 seeds with "
              "95% bands:", "", f"![seed-averaged curves]({seed_figures.FIGURES['curves']})", ""]
    lines += ["What each regime tests (conditions on GRPO's runs; they decide nothing): \"GRPO learns\" means "
              "*reward on the training pool rises* (reward-gain interval above 0) while held-out accuracy does "
              "not demonstrably fall; \"held-out accuracy rises\" is GRPO's validation change on the whole test "
              "split; \"collapses\" is the absolute entropy rule. The validation claim (VAL) is judged in "
              f"`{P.DEFAULT_VALIDATION_REGIME}`, the regime the held-out pilot accepted (`PILOT.md` section 7, "
              "pre-registration amendment 3; GRPO's seeds 0-4 there are the pilot's, selected for GRPO's own "
              "held-out gain, so the secondary \"seeds 5-14 alone\" row is VAL's unselected estimate); VAL in "
              "the other regimes is secondary (section 6). `learn-80`'s runs are bit-identical prefixes of "
              "`learn-240`'s, not independent evidence; the 240-step horizon was chosen after exact PROMA's "
              "240-step results on seeds 0-4 were in.", ""]
    if r.seeds.get("regime_checks"):
        lines += [claims.markdown(r.seeds["regime_checks"], first="condition"), ""]
    return lines


def secondary_section(r) -> list:
    """Section 6: the analyses of PREREGISTRATION.md section 4, which decide nothing."""
    if not r.seeds or r.meta["mode"] not in claims.JUDGED_MODES:
        return ["No secondary analysis outside the full study.", ""]
    results = r.seeds["results"]
    outcomes = P.decide(results)
    new = secondary.new_seeds_only(results)
    rows = []
    for o, n in zip(outcomes, new):
        loo = secondary.leave_one_out(results, o, others_p=[x.p for x in outcomes if x is not o])
        w = secondary.wilcoxon(o)
        loo_txt = (f"{loo['kept']}/{loo['subsets']} (under Holm {loo['kept_holm']}/{loo['subsets']}); estimate "
                   f"{loo['estimate'][0]:.3g} to {loo['estimate'][1]:.3g}" if loo else "-")
        rows.append((o.hypothesis.id, o.hypothesis.regime, _estimate(n), p_value(n.p) if n.estimate else "-",
                     p_value(o.p), "-" if w is None else p_value(w), loo_txt))
    lines = [f"Seeds {P.NEW_SEEDS[0]}-{P.NEW_SEEDS[-1]} alone (the runs collected after the pre-registration; "
             "unadjusted p), the Wilcoxon signed-rank p beside the paired t p (all seeds), and leave-one-seed-out "
             "(subsets of n - 1 seeds that keep p < 0.05 on the same side, unadjusted and with Holm re-applied "
             "over the family with the other hypotheses' p unchanged, and the range of the estimate):", "",
             table(["id", "regime", f"seeds {P.NEW_SEEDS[0]}-{P.NEW_SEEDS[-1]}: estimate", "p (new seeds)",
                    "p (t, all)", "p (Wilcoxon, all)", "leave-one-out"], rows), ""]
    kl = [(h.id, h.regime, label, stats.format_interval(iv), p_value(p)) for h, label, iv, p in secondary.kl_summaries(results)]
    lines += ["Other summaries of the per-step local KL (paired log-ratio, 95% t-interval, unadjusted p):", "",
              table(["id", "regime", "summary", "ratio", "p"], kl), ""]
    lines += ["The four comparisons behind VAL (intra minus each method, final greedy validation):", ""]
    val = next(o for o in outcomes if o.hypothesis.kind == "val")
    parts = [f"- vs {m}: {stats.format_interval(iv, '+.4f')}, p {p_value(p)}" for m, (iv, p, _) in (val.parts or {}).items()]
    lines += parts or [f"- no paired seeds yet in `{val.hypothesis.regime}`"]
    lines += ["", "Intra in this study is intra as it ran: its subspaces took every token whose float32 output gradient "
              "is non-zero (the rule of the time), which keeps tokens whose gradient is zero in exact arithmetic and "
              "only rounded; today's definition leaves them out, and on real minibatches of the same policy that "
              "changes some layers' intra result by far more than float32 rounding ([`intra_rows.md`](intra_rows.md)). "
              "The runs were not repeated."]
    elsewhere = secondary.val_elsewhere(results)
    if elsewhere:
        lines += ["", "VAL's test in the other regimes (secondary: held-out accuracy does not rise there; "
                  "unadjusted p):", ""]
        lines += [f"- {o.hypothesis.regime} ({o.n} seeds): {_estimate(o)}, p {p_value(o.p)}" for o in elsewhere]
    return lines + [""]
