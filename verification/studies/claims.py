"""Regime conditions and the absolute entropy rule: facts about GRPO's runs that say what a regime can test.

The verdicts on the paper's claims are :mod:`verification.studies.preregistered`'s (``reports/PREREGISTRATION.md``);
this module holds the descriptive rules printed beside them (the first and third unchanged from the first
study; the second is the condition that PREREGISTRATION.md section 2 names for the validation regime):

* *Reward on the training pool rises* ("GRPO learns"): the 95% t-interval over seeds of GRPO's reward gain
  lies above 0 and that of its validation change (held-out accuracy) does not lie below 0.
* *Held-out accuracy rises*: the interval of GRPO's validation change lies above 0 (what the validation regime
  was chosen for; ``reports/PILOT.md`` section 7).
* *Entropy collapses* (absolute rule): a run's rollout token entropy over the last quarter of rollout steps
  divided by its first step's (``entropy_end_ratio``) is below :data:`COLLAPSE_FRACTION`; a method collapses
  in a regime iff the interval of that ratio over seeds lies below it, and avoids collapse iff it lies above.

Input: per-run numbers ``{(method, lr, seed): {column: value}}`` (``verification.studies.tables.load_results``).
A condition is checked only with at least :data:`MIN_SEEDS` seeds, and never in quick mode.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import stats

INCONCLUSIVE = "inconclusive"
COLLAPSES, AVOIDS, UNDECIDED = "collapses", "avoids collapse", "undecided"
NOT_JUDGED_QUICK = "not judged in quick mode"
JUDGED_MODES = ("full",)
MIN_SEEDS = 5
COLLAPSE_FRACTION = 0.5
BASELINE = "grpo"
REGIME_RULES = {
    "learns": "grpo's reward gain interval lies above 0 and its validation change interval does not lie below 0",
    "heldout": "grpo's validation change interval lies above 0",
    "collapses": "grpo's entropy end/start interval lies below 1/2",
}
MET, NOT_MET = "met", "not met"
# What each condition measures, in the words the report uses ("learns" is about the training pool's reward).
CONDITION_NAMES = {"learns": "GRPO learns (reward on the training pool rises; held-out accuracy does not fall)",
                   "heldout": "GRPO's held-out accuracy rises",
                   "collapses": "GRPO collapses entropy"}


@dataclass(frozen=True)
class Verdict:
    claim: str
    rule: str
    where: str          # regime and learning rate
    evidence: str       # the interval(s) the rule was applied to
    verdict: str


def _seeds(runs: dict, method: str, lr: float) -> list:
    return sorted(s for m, ll, s in runs if m == method and ll == lr)


def absolute_entropy(runs: dict, method: str) -> tuple[dict, str] | None:
    """The absolute rule for ``method`` in one regime: (interval of its ``entropy_end_ratio``, label).

    Label :data:`COLLAPSES` iff the interval lies below :data:`COLLAPSE_FRACTION`, :data:`AVOIDS` iff above,
    else :data:`UNDECIDED`; None with fewer than 2 seeds.
    """
    values = [v["entropy_end_ratio"] for (m, _, _), v in sorted(runs.items()) if m == method]
    if len(values) < 2:
        return None
    iv = stats.t_interval(values)
    label = COLLAPSES if iv["hi"] < COLLAPSE_FRACTION else AVOIDS if iv["lo"] > COLLAPSE_FRACTION else UNDECIDED
    return iv, label


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


def check_heldout(runs: dict, lr: float) -> tuple[str, str]:
    """Does the baseline's held-out accuracy demonstrably rise at ``lr``? (:data:`REGIME_RULES` ``"heldout"``)."""
    seeds = _seeds(runs, BASELINE, lr)
    if len(seeds) < MIN_SEEDS:
        return f"{len(seeds)} seeds", INCONCLUSIVE
    if not all("val_change" in runs[(BASELINE, lr, s)] for s in seeds):
        return "no warm-start validation to compare with", INCONCLUSIVE
    change = stats.t_interval([runs[(BASELINE, lr, s)]["val_change"] for s in seeds])
    return f"validation change {stats.format_interval(change, '+.4f')}", MET if change["lo"] > 0 else NOT_MET


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
            for key, check in (("learns", check_learns), ("heldout", check_heldout), ("collapses", check_collapses)):
                claim = CONDITION_NAMES[key]
                evidence, v = ("-", NOT_JUDGED_QUICK) if mode not in JUDGED_MODES else check(runs, lr)
                out.append(Verdict(claim, REGIME_RULES[key], f"{regime}, lr {lr:g}", evidence, v))
    return out


def markdown(verdict_list: list[Verdict], *, first: str = "claim") -> str:
    """The verdict table (markdown), rules first so that they read as fixed before the evidence."""
    lines = [f"| {first} | rule (fixed before the numbers) | regime | evidence (95% t-intervals over seeds) | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {v.claim} | {v.rule} | {v.where} | {v.evidence} | **{v.verdict}** |" for v in verdict_list]
    return "\n".join(lines) + "\n"
