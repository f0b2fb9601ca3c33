"""The verdict table: each of the paper's three claims judged by a rule fixed before the numbers are seen.

Input: per-run numbers ``{(method, lr, seed): {column: value}}`` (``verification.study_seeds.load_results``;
columns ``local_kl_mean``, ``entropy_end_ratio``, ``val_final``). Intervals: 95% Student-t over seeds
(:mod:`verification.stats`); comparisons are paired by seed (runs with one seed share the warm-start and
the prompts). A claim is judged only with at least :data:`MIN_SEEDS` paired seeds, and never in quick mode.

The rules (:data:`RULES`, quoted verbatim in the table):

1. *PROMA keeps the local KL tighter than GRPO.* r = the per-seed ratio PROMA / GRPO of the mean exact local
   KL per optimizer step. Supported iff the 95% interval of r (log-ratio t) lies below 1; contradicted iff it
   lies above 1; else inconclusive.
2. *PROMA does not collapse entropy (GRPO does).* Collapse of a run = its rollout token entropy falls below
   :data:`COLLAPSE_FRACTION` of its first step's: its mean over the last quarter of rollout steps divided
   by the first step's (``entropy_end_ratio``) is < 1/2 (a mean, not the minimum, so that one low-entropy
   batch does not count). The claim can only be tested where GRPO demonstrably collapses: if the interval
   of GRPO's ``entropy_end_ratio`` does not lie below 1/2
   the verdict is inconclusive ("baseline does not collapse"). Otherwise supported iff PROMA's interval lies
   above 1/2; contradicted iff it lies below 1/2; else inconclusive.
3. *Intra is best on validation.* d_m = per-seed difference intra - m of the final greedy accuracy on the
   whole test split, for every other method m. Supported iff every d_m's interval lies above 0; contradicted
   iff some d_m's interval lies below 0 (another method is demonstrably better); else inconclusive.

Whether a regime can decide the claims is itself checked by rules on GRPO's runs (:data:`REGIME_RULES`,
:func:`regime_checks`): *GRPO learns* iff the 95% interval of its reward gain lies above 0 and that of its
validation change does not lie below 0 (held-out accuracy does not demonstrably fall); *GRPO's entropy
collapses* iff the interval of its ``entropy_end_ratio`` lies below 1/2.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import stats

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
NOT_JUDGED_QUICK = "not judged in quick mode"
JUDGED_MODES = ("full",)
MIN_SEEDS = 5
COLLAPSE_FRACTION = 0.5
BASELINE = "grpo"
RULES = {
    "kl": "supported iff the 95% interval of the paired ratio {method}/grpo of mean local KL lies below 1; "
          "contradicted iff above 1; else inconclusive",
    "entropy": "collapse = rollout entropy (last-quarter mean) below 1/2 of its start; testable only if grpo's "
               "end/start interval "
               "lies below 1/2; then supported iff {method}'s lies above 1/2, contradicted iff below 1/2",
    "intra": "supported iff the paired difference intra - m of final validation accuracy lies above 0 for every "
             "other method m; contradicted iff it lies below 0 for some m; else inconclusive",
}
CLAIMS = {
    "kl": "{method} keeps the local KL tighter than GRPO",
    "entropy": "{method} does not collapse entropy",
    "intra": "intra is best on validation",
}


REGIME_RULES = {
    "learns": "grpo's reward gain interval lies above 0 and its validation change interval does not lie below 0",
    "collapses": "grpo's entropy end/start interval lies below 1/2",
}
MET, NOT_MET = "met", "not met"


@dataclass(frozen=True)
class Verdict:
    claim: str
    rule: str
    where: str          # regime and learning rate
    evidence: str       # the interval(s) the rule was applied to
    verdict: str


def _paired(runs: dict, a: str, b: str, lr: float, column: str):
    seeds = sorted(s for m, ll, s in runs if m == a and ll == lr and (b, lr, s) in runs)
    return [runs[(a, lr, s)][column] for s in seeds], [runs[(b, lr, s)][column] for s in seeds]


def _seeds(runs: dict, method: str, lr: float) -> list:
    return sorted(s for m, ll, s in runs if m == method and ll == lr)


def judge_kl(runs: dict, lr: float, method: str = "proma") -> tuple[str, str]:
    a, b = _paired(runs, method, BASELINE, lr, "local_kl_mean")
    if len(a) < MIN_SEEDS:
        return f"{len(a)} paired seeds", INCONCLUSIVE
    iv = stats.paired_ratio_t(a, b)
    verdict = SUPPORTED if iv["hi"] < 1 else CONTRADICTED if iv["lo"] > 1 else INCONCLUSIVE
    return f"ratio {stats.format_interval(iv)} ({iv['n']} seeds)", verdict


def judge_entropy(runs: dict, lr: float, method: str = "proma") -> tuple[str, str]:
    sb, sm = _seeds(runs, BASELINE, lr), _seeds(runs, method, lr)
    if min(len(sb), len(sm)) < MIN_SEEDS:
        return f"{len(sb)} / {len(sm)} seeds", INCONCLUSIVE
    base = stats.t_interval([runs[(BASELINE, lr, s)]["entropy_end_ratio"] for s in sb])
    mine = stats.t_interval([runs[(method, lr, s)]["entropy_end_ratio"] for s in sm])
    evidence = (f"end/start entropy: grpo {stats.format_interval(base)}, {method} {stats.format_interval(mine)}")
    if not base["hi"] < COLLAPSE_FRACTION:
        return evidence + " (baseline does not collapse)", INCONCLUSIVE
    if mine["lo"] > COLLAPSE_FRACTION:
        return evidence, SUPPORTED
    return evidence, CONTRADICTED if mine["hi"] < COLLAPSE_FRACTION else INCONCLUSIVE


def judge_intra(runs: dict, lr: float) -> tuple[str, str]:
    others = sorted({m for m, ll, _ in runs if ll == lr and m != "intra"})
    parts, above, below = [], True, False
    for m in others:
        a, b = _paired(runs, "intra", m, lr, "val_final")
        if len(a) < MIN_SEEDS:
            return f"{len(a)} paired seeds with {m}", INCONCLUSIVE
        iv = stats.paired_difference_t(a, b)
        parts.append(f"vs {m} {stats.format_interval(iv, '+.4f')}")
        above, below = above and iv["lo"] > 0, below or iv["hi"] < 0
    if not parts:
        return "no other method", INCONCLUSIVE
    return "; ".join(parts), CONTRADICTED if below else SUPPORTED if above else INCONCLUSIVE


def check_learns(runs: dict, lr: float) -> tuple[str, str]:
    """Does the baseline demonstrably learn at ``lr``? (:data:`REGIME_RULES` ``"learns"``)."""
    seeds = _seeds(runs, BASELINE, lr)
    if len(seeds) < MIN_SEEDS:
        return f"{len(seeds)} seeds", INCONCLUSIVE
    gain = stats.t_interval([runs[(BASELINE, lr, s)]["reward_gain"] for s in seeds])
    evidence = f"reward gain {stats.format_interval(gain)}"
    falls = False
    if all("val_change" in runs[(BASELINE, lr, s)] for s in seeds):
        change = stats.t_interval([runs[(BASELINE, lr, s)]["val_change"] for s in seeds])
        evidence += f", validation change {stats.format_interval(change, '+.3f')}"
        falls = change["hi"] < 0
    else:
        evidence += ", no warm-start validation to compare with"
        falls = True
    return evidence, MET if gain["lo"] > 0 and not falls else NOT_MET


def check_collapses(runs: dict, lr: float) -> tuple[str, str]:
    """Does the baseline's entropy demonstrably collapse at ``lr``? (:data:`REGIME_RULES` ``"collapses"``)."""
    seeds = _seeds(runs, BASELINE, lr)
    if len(seeds) < MIN_SEEDS:
        return f"{len(seeds)} seeds", INCONCLUSIVE
    ratio = stats.t_interval([runs[(BASELINE, lr, s)]["entropy_end_ratio"] for s in seeds])
    return f"entropy end/start {stats.format_interval(ratio)}", MET if ratio["hi"] < COLLAPSE_FRACTION else NOT_MET


def regime_checks(results: dict, *, mode: str) -> list[Verdict]:
    """Both regime conditions in every (regime, lr) of ``results = {regime: runs}`` (quick/smoke: not judged)."""
    out = []
    for regime, runs in results.items():
        for lr in sorted({ll for _, ll, _ in runs}):
            for key, check in (("learns", check_learns), ("collapses", check_collapses)):
                claim = f"GRPO {'learns' if key == 'learns' else 'collapses entropy'}"
                evidence, v = ("-", NOT_JUDGED_QUICK) if mode not in JUDGED_MODES else check(runs, lr)
                out.append(Verdict(claim, REGIME_RULES[key], f"{regime}, lr {lr:g}", evidence, v))
    return out


def verdicts(results: dict, *, mode: str, proma_methods=("proma", "proma-paper")) -> list[Verdict]:
    """Every claim in every (regime, lr) of ``results = {regime: runs}``; quick/smoke modes judge nothing."""
    out = []
    for regime, runs in results.items():
        for lr in sorted({ll for _, ll, _ in runs}):
            where = f"{regime}, lr {lr:g}"
            todo = [(key, m) for key in ("kl", "entropy") for m in proma_methods
                    if any(mm == m and ll == lr for mm, ll, _ in runs)] + [("intra", "intra")]
            for key, m in todo:
                claim, rule = CLAIMS[key].format(method=m), RULES[key].format(method=m)
                if mode not in JUDGED_MODES:
                    out.append(Verdict(claim, rule, where, "-", NOT_JUDGED_QUICK))
                    continue
                evidence, v = (judge_intra(runs, lr) if key == "intra" else
                               (judge_kl if key == "kl" else judge_entropy)(runs, lr, m))
                out.append(Verdict(claim, rule, where, evidence, v))
    return out


def markdown(verdict_list: list[Verdict], *, first: str = "claim") -> str:
    """The verdict table (markdown), rules first so that they read as fixed before the evidence."""
    lines = [f"| {first} | rule (fixed before the numbers) | regime | evidence (95% t-intervals over seeds) | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {v.claim} | {v.rule} | {v.where} | {v.evidence} | **{v.verdict}** |" for v in verdict_list]
    return "\n".join(lines) + "\n"
