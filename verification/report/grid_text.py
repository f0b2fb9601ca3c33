"""REPORT.md sections 3, 4 and 8: the single-seed grid's KL control, entropy and learning, and its reading (text).

Every sentence that states a result is built from numbers passed in, with the direction of the comparison
decided by those numbers (no conclusion is written in advance).
"""
from __future__ import annotations

import math

import numpy as np

from .inputs import ReportInputs
from .markdown import f, pct, table

PROJECTED = ("proma", "proma-paper", "intra")


COLLAPSE_RATIO = 0.5  # "entropy collapse": final entropy below half of the initial entropy


def _by(summaries, method, lr):
    return next((s for s in summaries if s["method"] == method and s["lr"] == lr), None)


def _ratio(a, b):
    return a / b if (a is not None and b and math.isfinite(a) and math.isfinite(b) and b > 0) else math.nan


def _compare_word(ratio: float, lower="lower", higher="higher") -> str:
    if not math.isfinite(ratio):
        return "not comparable"
    if abs(ratio - 1) < 0.05:
        return "about equal"
    return lower if ratio < 1 else higher


def _x(ratio) -> str:
    return f"{f(ratio, 2)}x" if ratio is not None and math.isfinite(ratio) else "n/a"


def _val_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.25 / max(n, 1)) / max(n, 1))


def _kl_tables(summaries) -> dict:
    rows_local = [(s["method"], f"{s['lr']:g}", f(s["local_kl"]["mean"]), f(s["local_kl"]["p95"]),
                   f(s["local_kl"]["max"]), f(s["local_kl_seq"]["mean"])) for s in summaries]
    rows_second = [(s["method"], f"{s['lr']:g}", f(s["second_order"]["median_ratio"]),
                    f"{f(s['second_order']['ratio_p5'])} - {f(s['second_order']['ratio_p95'])}",
                    f(s["second_order"]["log_corr"]), s["second_order"]["n"]) for s in summaries]
    rows_roll = [(s["method"], f"{s['lr']:g}", f(s["kl_rollout"]["mean"]), f(s["kl_rollout"]["max"]),
                  f(s["clip_ratio"]["mean"])) for s in summaries]
    return {"local": rows_local, "second": rows_second, "rollout": rows_roll}


def _second_order_text(summaries) -> list:
    med = [s["second_order"]["median_ratio"] for s in summaries if math.isfinite(s["second_order"]["median_ratio"])]
    cor = [s["second_order"]["log_corr"] for s in summaries if math.isfinite(s["second_order"]["log_corr"])]
    if not med:
        return ["- Not enough steps with both the exact and the second-order KL to compare."]
    m = float(np.median(med))
    direction = ("overestimates" if m > 1.1 else "underestimates" if m < 0.9 else "matches")
    lines = [f"- Over all runs the second-order estimate {direction} the exact sequence-level local KL (median "
             f"ratio {f(m)}, per-run medians {f(min(med))} to {f(max(med))})"
             + (f"; the logs correlate at {f(float(np.median(cor)))} (median over runs)." if cor else ".")]
    lines.append("- The estimate uses the empirical Fisher of the sampled sequences (0.5 mean_i (g_i.dθ)²), which "
                 "is a noisy, sample-based stand-in for the exact Fisher; with Adam the step dθ is not small in every "
                 "direction, so third-order terms also enter the exact KL.")
    return lines


def _proma_vs_grpo(summaries) -> tuple:
    from ..studies.equal_gain import kl_at_equal_gain

    lrs = sorted({s["lr"] for s in summaries})
    rows, text = [], []
    for lr in lrs:
        g = _by(summaries, "grpo", lr)
        if g is None:
            continue
        for m in PROJECTED + ("reinforce",):
            s = _by(summaries, m, lr)
            if s is None:
                continue
            rows.append((f"{lr:g}", m, _x(_ratio(s["local_kl"]["mean"], g["local_kl"]["mean"])),
                         _x(_ratio(s["local_kl"]["p95"], g["local_kl"]["p95"])),
                         _x(_ratio(s["local_kl"]["max"], g["local_kl"]["max"])),
                         f(s["reward_gain"]), f(g["reward_gain"])))
    gain_rows = []
    for m in PROJECTED + ("reinforce",):
        pa = [(s["reward_gain"], s["local_kl"]["mean"]) for s in summaries if s["method"] == m]
        pb = [(s["reward_gain"], s["local_kl"]["mean"]) for s in summaries if s["method"] == "grpo"]
        eq = kl_at_equal_gain(pa, pb)
        if eq is None:
            gain_rows.append((m, "-", "-", "-", "reward-gain ranges (positive part) do not overlap"))
            if m == "proma":
                text.append("- PROMA and GRPO reached no common positive reward gain at the learning rates run, so "
                            "they cannot be compared at equal gain here.")
        else:
            r = _ratio(eq["kl_a"], eq["kl_b"])
            gain_rows.append((m, f(eq["gain"]), f(eq["kl_a"]), f(eq["kl_b"]), _x(r)))
            text.append(f"- At a common reward gain of {f(eq['gain'])}, {m}'s interpolated mean local KL is {_x(r)} "
                        f"GRPO's ({_compare_word(r, 'tighter', 'looser')}).")
    at_lr = []
    for lr in lrs:
        p, g = _by(summaries, "proma", lr), _by(summaries, "grpo", lr)
        if p and g:
            r = _ratio(p["local_kl"]["mean"], g["local_kl"]["mean"])
            at_lr.append(f"- At lr {lr:g}, PROMA's mean local KL is {_x(r)} GRPO's "
                         f"({_compare_word(r, 'tighter', 'looser')}); reward gain {f(p['reward_gain'])} vs "
                         f"{f(g['reward_gain'])}.")
    return rows, gain_rows, at_lr + text


def _claims(meta, studies, summaries) -> list:
    """Section 8: the single-seed grid read against each claim (describes these runs, decides nothing)."""
    lines = ["One seed per (method, learning rate): the single-seed numbers below describe these runs and issue no "
             "verdict; the verdicts, with intervals over seeds and pre-registered rules, are in the verdict table "
             "that opens the report.", ""]
    return (lines + _claim_kl(summaries) + _claim_entropy(meta, summaries) + _claim_validation(meta, summaries)
            + _claim_context(meta, studies))


def _claim_kl(summaries) -> list:
    lrs = sorted({s["lr"] for s in summaries})
    lines, verdicts = [], []
    for lr in lrs:
        p, g = _by(summaries, "proma", lr), _by(summaries, "grpo", lr)
        if p and g:
            r = _ratio(p["local_kl"]["mean"], g["local_kl"]["mean"])
            verdicts.append((lr, r))
    if verdicts and not any(math.isfinite(r) for _, r in verdicts):
        lines.append("- **Tighter KL than GRPO.** Not measurable here: GRPO's local KL is zero or missing at every "
                     "learning rate (no non-zero advantage, hence no update).")
    elif verdicts:
        parts = ", ".join(f"{_x(r)} at lr {lr:g}" for lr, r in verdicts)
        vs_rf = [(lr, _ratio(_by(summaries, "proma", lr)["local_kl"]["mean"],
                             _by(summaries, "reinforce", lr)["local_kl"]["mean"]))
                 for lr, _ in verdicts if _by(summaries, "reinforce", lr)]
        rf_txt = (" Against REINFORCE, which uses the same per-sequence weights and differs from PROMA only in the "
                  "accumulation, the ratio is " + ", ".join(f"{_x(r)} at lr {lr:g}" for lr, r in vs_rf) + ".") if vs_rf else ""
        lines.append(f"- **Tighter KL than GRPO.** PROMA's mean per-step local KL is {parts} GRPO's (one seed "
                     f"each).{rf_txt} Equal-gain comparisons are in section 3.4; with {len(lrs)} learning rates "
                     "and one seed they rest on few points.")
    return lines


def _claim_entropy(meta, summaries) -> list:
    ent = {m: [s["entropy_ratio"] for s in summaries if s["method"] == m and math.isfinite(s["entropy_ratio"])]
           for m in ("proma", "grpo", "reinforce", "proma-paper", "intra")}
    collapsed = sorted({s["method"] for s in summaries if math.isfinite(s["entropy_ratio"])
                        and s["entropy_ratio"] < COLLAPSE_RATIO})
    ent_txt = ", ".join(f"{m} {'/'.join(f(x, 2) for x in v)}" for m, v in ent.items() if v)
    if not collapsed:
        verdict = (f"no run's last-quarter entropy fell below half its start within {meta['grid']['steps']} rollout "
                   "steps, so these runs cannot test the claim")
    else:
        verdict = f"runs whose last-quarter entropy fell below half its start: {', '.join(collapsed)}"
    return [f"- **No entropy collapse.** Final/initial token entropy per learning rate: {ent_txt}; {verdict}."]


def _claim_validation(meta, summaries) -> list:
    lines, lrs, c = [], sorted({s["lr"] for s in summaries}), meta["harness_config"]
    n_eval = int(c.get("eval_size", 0) or 0)
    best_txt = []
    for lr in lrs:
        row = [(s["val_end"], s["method"]) for s in summaries if s["lr"] == lr and math.isfinite(s["val_end"])]
        if not row:
            continue
        row.sort(reverse=True)
        top_val = row[0][0]
        best = [m for v, m in row if v == top_val]
        iv = next((v for v, m in row if m == "intra"), math.nan)
        se = _val_se(top_val, n_eval) if n_eval else math.nan
        rank = 1 + sum(v > iv for v, _ in row) if math.isfinite(iv) else None
        best_txt.append(f"at lr {lr:g}, intra {f(iv)} ranks {rank if rank else '-'} of {len(row)} (highest: "
                        f"{' = '.join(best)} {f(top_val)}; one standard error ≈ {f(se)} on {n_eval} problems)")
    fell = [s for s in summaries if math.isfinite(s["val_end"]) and s["val_end"] < s["val_start"]]
    if summaries and len(fell) == len(summaries):
        lines.append(f"- **Validation fell in every run.** Greedy validation accuracy ended below the warm-start's "
                     f"({f(summaries[0]['val_start'])}) for every method and learning rate (by "
                     f"{f(min(s['val_start'] - s['val_end'] for s in fell))} to "
                     f"{f(max(s['val_start'] - s['val_end'] for s in fell))}), while the rollout reward on the training "
                     f"prompts rose in {sum(s['reward_gain'] > 0 for s in summaries)} of {len(summaries)} runs: on "
                     "this small task RL sharpens the sampling distribution on the training pool more than it "
                     "improves greedy answers on held-out problems. 'Best on validation' below therefore means "
                     "'least degraded'.")
    if best_txt:
        lines.append("- **Intra best on validation.** Rank of intra's final validation among the methods: "
                     + "; ".join(best_txt) + ". One seed, and differences "
                     "below two standard errors are within evaluation noise.")
    return lines


def _claim_context(meta, studies) -> list:
    """What the published settings compute, and why the small model's numbers may not transfer."""
    lines, c = [], meta["harness_config"]
    for snap, st in studies.items():
        paper = st["settings"]["paper: gram_schmidt 2, bound 0.5"]["rel_dist_to_exact"]
        lines.append(f"- **What the published settings compute** ({snap} policy): Gram-Schmidt with 2 passes and "
                     f"relative bound 0.5 ends {f(paper)} from the exact layer-wise projection; conclusions drawn "
                     "from the published runs are about that operator, not about the exact projection.")
        break
    # Transfer
    study = next(iter(studies.values()), None)
    n_par = study["n_parameters"] if study else None
    b = c.get("microbatch_size")
    lines.append(
        f"- **Why this may not transfer to Qwen3-0.6B.** The policy here has {n_par:,} parameters "
        f"(Qwen3-0.6B: ~6e8), microbatches of {b} sequences and {c.get('minibatches')} optimizer steps per rollout of "
        f"{c.get('prompts_per_step', 0) * c.get('group_size', 0)} completions of at most {c.get('max_new_tokens') or 10} "
        f"tokens on calculator steps, {meta['grid']['steps']} rollout steps and one seed. The projection removes "
        "directions spanned by a few sequence gradients per tensor; the fraction of a tensor's space that this "
        "covers, how aligned successive microbatches are, and Adam's rescaling all change with model size, "
        "sequence length and batch layout, and a single seed cannot separate method effects from run-to-run noise."
        if n_par else "- **Transfer.** No projection study ran.")
    return lines


def _kl_intro(r: ReportInputs) -> list:
    return ["`local_kl`: exact KL(π_before || π_after) of one optimizer step, summed over the vocabulary and "
            "averaged over the minibatch's scored tokens; `local_kl_seq`: the same summed per sequence (mean over "
            "sequences); second-order estimate: 0.5 mean_i (g_i . dθ)², the Fisher quadratic form of the step "
            "(exact directional derivatives); `kl`: KL(π_rollout || π_after).", ""]


def _local_kl(r: ReportInputs) -> list:
    return [table(["method", "lr", "mean", "p95", "max", "mean (sequence-level)"], _kl_tables(r.summaries)["local"]),
            "", f"![local KL]({r.figures['local_kl']})", ""]


def _second_order(r: ReportInputs) -> list:
    return ([table(["method", "lr", "median estimate/exact", "5-95% range", "corr. of logs", "steps"],
                   _kl_tables(r.summaries)["second"]), "", f"![second-order]({r.figures['second_order']})", ""]
            + _second_order_text(r.summaries) + [""])


def _kl_rollout(r: ReportInputs) -> list:
    return [table(["method", "lr", "mean", "max", "PPO clip fraction (mean)"], _kl_tables(r.summaries)["rollout"]),
            "", f"![KL to rollout policy]({r.figures['kl_rollout']})", ""]


def _proma_vs_grpo_section(r: ReportInputs) -> list:
    eq_lr, eq_gain, eq_text = _proma_vs_grpo(r.summaries)
    return (["At equal learning rate (ratios of the method's statistic to GRPO's; < 1 is tighter):", "",
             table(["lr", "method", "mean KL ratio", "p95 ratio", "max ratio", "reward gain", "grpo reward gain"],
                   eq_lr), "",
             "At equal reward gain (mean local KL interpolated in log space between each method's learning rates, "
             "at the midpoint of the overlap of their positive reward gains):", "",
             table(["method", "common reward gain", "method KL", "grpo KL", "ratio"], eq_gain), "",
             f"![KL vs reward gain]({r.figures['kl_vs_gain']})", ""] + eq_text + [""])


def _learning(r: ReportInputs) -> list:
    rows = [(s["method"], f"{s['lr']:g}", f"{f(s['reward_start'])} → {f(s['reward_end'])}",
             f"{f(s['val_start'])} → {f(s['val_end'])} (max {f(s['val_max'])})",
             f"{f(s['entropy_start'])} → {f(s['entropy_end'])} ({f(s['entropy_ratio'], 2)}x)",
             pct(s["removed_ratio"]["mean"]) if s["method"] in PROJECTED else "-",
             f(s["step_time"])) for s in r.summaries]
    return [f"Reward is the rollout mean; validation is greedy exact match on {r.n_eval} fixed test problems; entropy "
            "is the mean token entropy of the policy on its rollouts. Mean removed ratio: ‖R‖ / ‖pg_m‖, the removed "
            "component relative to the microbatch's OWN gradient pg_m (the accumulator's statistics, norms over all "
            "projected tensors, averaged over the microbatches of every optimizer step, the first microbatch "
            "counting 0) — not section 2.2's ‖R‖ / ‖G_in‖ (relative to the running gradient), so it can exceed "
            "100%.", "",
            table(["method", "lr", "reward (first → last quarter)", "validation accuracy (start → end)",
                   "entropy (start → last quarter)", "mean removed ratio ‖R‖/‖pg_m‖", "step time (s)"], rows), "",
            f"![reward]({r.figures['reward']})", "", f"![entropy]({r.figures['entropy']})", "",
            f"![validation accuracy]({r.figures['val']})", ""]
