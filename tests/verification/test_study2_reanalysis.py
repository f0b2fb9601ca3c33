"""Independent re-analysis of study 2's primary family (``reports/PREREGISTRATION-2.md``).

The fifteen pre-registered statistics are recomputed from the raw per-run JSON files and
the written rules alone (sections 1, 2, 4, 5 of the pre-registration; the column
definitions of ``reports/REPORT.md``) and compared with the project's analysis, of which
only the entry point under test is imported.

Conventions the written rules leave open, settled by comparison:

- a hypothesis uses the planned seeds (0-9; 0-14 in X) whose every needed run exists;
  the pilot's seeds 100-104 (also in X's folder) never enter a hypothesis;
- while in progress the project already shows Holm-adjusted p over every hypothesis that
  has a p, and every verdict reads "in progress".
"""

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "reports" / "data" / "study2"

REL_TOL = 1e-9
ABS_FLOOR = 1e-15  # only matters for a statistic that is exactly zero
ALPHA = 0.05
CONFIDENCE = 0.95
COLLAPSE_LINE = 0.5  # section 4 and AC-*-X: end/start below 1/2 is a collapse
MIN_SEEDS = 2  # a t-interval needs a spread
IN_PROGRESS = "in progress"

RUN_NAME = re.compile(r"^(?P<method>[a-z-]+?)-lr(?P<lr>[0-9.e+-]+)-s(?P<seed>\d+)\.json$")

# Section 1: frontier rates (0.5x, 1x, 2x), the 1x rates, the planned seeds.
FRONTIER_RATES = {"learn-240": (5e-5, 1e-4, 2e-4), "collapse": (1.5e-4, 3e-4, 6e-4)}
ONE_X = {"learn-240": 1e-4, "collapse": 3e-4, "learn-240-mb1": 1e-4, "collapse-mb1": 3e-4}
PLANNED_SEEDS = 10
PLANNED_SEEDS_X = 15
PILOT_SEEDS = tuple(range(100, 105))
# Section 4: the candidates in the order they are tried, each with its rate.
PILOT_CANDIDATES = (("collapse-120", 3e-4), ("collapse-lr6e-4", 6e-4), ("pool16-120", 3e-4))
X = "X"  # stands for the regime the pilot accepted


@dataclass(frozen=True)
class Spec:
    """One row of section 5's table.

    ``kind``: "frontier" (Delta_s), "log_kl" (log-ratio of K_oos), "entropy" (paired
    difference of E) or "absolute" (E against 1/2). ``direction``: the sign of a
    supporting estimate, 0 for the undirected CODE rows.
    """

    id: str
    kind: str
    regime: str
    method: str
    against: str | None
    direction: int


SPECS = (
    Spec("F-G-L", "frontier", "learn-240", "proma", "grpo", +1),
    Spec("F-G-C", "frontier", "collapse", "proma", "grpo", +1),
    Spec("F-P-L", "frontier", "learn-240", "proma-paper", "grpo", +1),
    Spec("F-P-C", "frontier", "collapse", "proma-paper", "grpo", +1),
    Spec("M-G-L", "log_kl", "learn-240-mb1", "proma", "grpo", -1),
    Spec("M-G-C", "log_kl", "collapse-mb1", "proma", "grpo", -1),
    Spec("EN-G-X", "entropy", X, "proma", "grpo", +1),
    Spec("EN-P-X", "entropy", X, "proma-paper", "grpo", +1),
    Spec("EN-R-X", "entropy", X, "proma", "reinforce", +1),
    Spec("AC-G-X", "absolute", X, "proma", None, +1),
    Spec("AC-P-X", "absolute", X, "proma-paper", None, +1),
    Spec("CODE-K-L", "log_kl", "learn-240", "proma-code", "proma-paper", 0),
    Spec("CODE-K-C", "log_kl", "collapse", "proma-code", "proma-paper", 0),
    Spec("CODE-E-L", "entropy", "learn-240", "proma-code", "proma-paper", 0),
    Spec("CODE-E-C", "entropy", "collapse", "proma-code", "proma-paper", 0),
)


@dataclass
class Mine:
    """This module's numbers for one hypothesis; the estimate on the reported scale."""

    n: int
    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    p: float = math.nan
    p_adj: float = math.nan
    sign: float = 0.0  # of the effect, relative to "no effect"


def run_numbers(metrics):
    """Section 2's per-run endpoints G, E and K_oos.

    Parameters
    ----------
    metrics : list of dict
        The run's records, one per optimizer step.

    Returns
    -------
    dict
        ``G`` reward gain, ``E`` entropy end/start, ``K`` mean out-of-sample local KL.
    """
    # Reward and entropy belong to the rollout and repeat on each minibatch's record.
    rollout = {}
    for record in metrics:
        rollout.setdefault(record["step"], record)
    steps = sorted(rollout)
    quarter = len(steps) // 4
    reward = np.array([rollout[s]["reward"] for s in steps])
    entropy = np.array([rollout[s]["entropy"] for s in steps])
    return {"G": reward[-quarter:].mean() - reward[:quarter].mean(),
            "E": entropy[-quarter:].mean() / entropy[0],
            "K": float(np.mean([r["oos_local_kl"] for r in metrics]))}


def load_runs(root):
    """Every run under ``root`` as {(regime, method, lr, seed): run_numbers(...)}.

    Parameters
    ----------
    root : Path
        The study's data folder, one sub-folder per regime.
    """
    runs = {}
    for path in sorted(root.glob("*/*.json")):
        match = RUN_NAME.match(path.name)
        if match is None:  # warm-start and start-eval records are not runs
            continue
        key = (path.parent.name, match["method"], float(match["lr"]), int(match["seed"]))
        runs[key] = run_numbers(json.loads(path.read_text())["metrics"])
    return runs


def t_summary(values, null=0.0):
    """Mean, 95% Student-t interval and two-sided one-sample p against ``null``.

    Parameters
    ----------
    values : array_like
        One number per seed.
    null : float
        The mean under the null hypothesis.

    Returns
    -------
    tuple of float
        (mean, lo, hi, p).
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = values.mean()
    se = values.std(ddof=1) / math.sqrt(n)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * se
    return mean, mean - half, mean + half, 2 * stats.t.sf(abs((mean - null) / se), n - 1)


def holm(pvalues):
    """Holm's step-down adjustment of {id: p}, returned as {id: adjusted p}."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        # The running maximum keeps the adjusted p in the order of the raw p.
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def pilot_x(runs):
    """Section 4: the first candidate whose GRPO E interval lies below 1/2, else None."""
    for regime, lr in PILOT_CANDIDATES:
        keys = [(regime, "grpo", lr, s) for s in PILOT_SEEDS]
        if not all(k in runs for k in keys):
            return None
        if t_summary([runs[k]["E"] for k in keys])[2] < COLLAPSE_LINE:
            return regime
    return None


def frontier_deltas(spec, runs):
    """Section 5's Delta_s, as (seeds, values), for every seed whose six runs exist."""
    seeds, deltas = [], []
    for seed in range(PLANNED_SEEDS):
        keys = {m: [(spec.regime, m, lr, seed) for lr in FRONTIER_RATES[spec.regime]]
                for m in (spec.method, spec.against)}
        if not all(k in runs for ks in keys.values() for k in ks):
            continue
        log_k = {m: np.log([runs[k]["K"] for k in ks]) for m, ks in keys.items()}
        gain = {m: np.array([runs[k]["G"] for k in ks]) for m, ks in keys.items()}
        # k*_s: the mean of both methods' six log K_oos of this seed.
        k_star = np.mean(np.concatenate(list(log_k.values())))
        fitted = {m: np.polyval(np.polyfit(log_k[m], gain[m], 1), k_star) for m in keys}
        deltas.append(fitted[spec.method] - fitted[spec.against])
        seeds.append(seed)
    return seeds, deltas


def seed_values(spec, runs, x_regime):
    """The per-seed numbers a hypothesis is tested on, as (seeds, values).

    Parameters
    ----------
    spec : Spec
        The hypothesis.
    runs : dict
        As returned by :func:`load_runs`.
    x_regime : str
        The regime the pilot accepted.
    """
    if spec.kind == "frontier":
        return frontier_deltas(spec, runs)
    in_x = spec.regime == X
    regime = x_regime if in_x else spec.regime
    lr = dict(PILOT_CANDIDATES)[regime] if in_x else ONE_X[regime]
    methods = (spec.method,) if spec.against is None else (spec.method, spec.against)
    seeds, values = [], []
    # Only planned seeds: the pilot's runs in X's folder never enter a hypothesis.
    for seed in range(PLANNED_SEEDS_X if in_x else PLANNED_SEEDS):
        keys = [(regime, m, lr, seed) for m in methods]
        if not all(k in runs for k in keys):
            continue
        seeds.append(seed)
        ends = [runs[k]["E"] for k in keys]
        if spec.kind == "log_kl":
            values.append(math.log(runs[keys[0]]["K"] / runs[keys[1]]["K"]))
        else:
            values.append(ends[0] if spec.kind == "absolute" else ends[0] - ends[1])
    return seeds, values


def reanalyse(runs, x_regime):
    """All fifteen hypotheses as {id: Mine}, Holm over those that have a p."""
    mine = {}
    for spec in SPECS:
        seeds, values = seed_values(spec, runs, x_regime)
        result = mine[spec.id] = Mine(n=len(seeds))
        if result.n < MIN_SEEDS:
            continue
        null = COLLAPSE_LINE if spec.kind == "absolute" else 0.0
        mean, lo, hi, result.p = t_summary(values, null)
        result.sign = float(np.sign(mean - null))
        if spec.kind == "log_kl":  # the exponentiated interval of the mean log-ratio
            mean, lo, hi = math.exp(mean), math.exp(lo), math.exp(hi)
        result.mean, result.lo, result.hi = mean, lo, hi
    for key, p_adj in holm({k: r.p for k, r in mine.items() if not math.isnan(r.p)}).items():
        mine[key].p_adj = p_adj
    return mine


def family_complete(mine):
    """Whether every hypothesis has its planned seeds (section 1: 10; 15 in X)."""
    return all(mine[s.id].n == (PLANNED_SEEDS_X if s.regime == X else PLANNED_SEEDS)
               for s in SPECS)


def expected_verdict(spec, result):
    """Section 5's decision rule on this module's numbers, for a complete family."""
    if spec.direction == 0:
        if result.p_adj >= ALPHA:
            return "no difference shown"
        return "differs (higher)" if result.sign > 0 else "differs (lower)"
    if result.p_adj >= ALPHA:
        return "inconclusive"
    return "supported" if result.sign == spec.direction else "contradicted"


def close(mine, theirs):
    """Whether two statistics agree to the stated relative tolerance."""
    return math.isclose(mine, theirs, rel_tol=REL_TOL, abs_tol=ABS_FLOOR)


def mismatches(mine, theirs):
    """Every disagreement in seeds, estimate, p and (where applied) Holm p, as text.

    Parameters
    ----------
    mine : dict
        {id: Mine} from :func:`reanalyse`.
    theirs : dict
        {id: the project's outcome}.
    """
    found = []
    for spec in SPECS:
        a, b = mine[spec.id], theirs[spec.id]
        if a.n < MIN_SEEDS:
            if b.estimate is not None:  # too few seeds for an interval on either side
                found.append(f"{spec.id}: {a.n} seeds, project estimate {b.estimate}")
            continue
        if b.estimate is None or b.n != a.n:
            found.append(f"{spec.id}: n {a.n}, project n {b.n}, estimate {b.estimate}")
            continue
        pairs = {"mean": (a.mean, b.estimate["mean"]), "lo": (a.lo, b.estimate["lo"]),
                 "hi": (a.hi, b.estimate["hi"]), "p": (a.p, b.p)}
        # The project may hold Holm back (NaN) while in progress; compare where applied.
        if b.p_adj is not None and not math.isnan(b.p_adj):
            pairs["p_adj"] = (a.p_adj, b.p_adj)
        found += [f"{spec.id} {k}: mine {x!r}, project {y!r}"
                  for k, (x, y) in pairs.items() if not close(x, y)]
    return found


def analyse_both(root):
    """The project's outcomes and this module's numbers for the data under ``root``."""
    from verification.report.study2_section import load_study2
    from verification.studies import preregistered2 as P2

    study = load_study2(str(root))
    outcomes = P2.decide(study["results"], x_regime=study["x"], pilot_over=study["pilot_over"])
    runs = load_runs(root)
    return {"study": study, "runs": runs, "theirs": {o.hypothesis.id: o for o in outcomes},
            "mine": reanalyse(runs, study["x"]) if study["x"] else None}


def complete_copy(root, x_regime):
    """Fill every planned run missing under ``root`` with a copy of an existing seed's.

    Made-up data, only to exercise the decision rule before the study is complete: the
    copy of seed ``s`` is the ``s mod k``-th of the cell's k existing seeds.
    """
    cells = {}
    for path in root.glob("*/*.json"):
        match = RUN_NAME.match(path.name)
        if match and int(match["seed"]) not in PILOT_SEEDS:
            cells.setdefault((path.parent, match["method"], match["lr"]), []).append(path)
    for (folder, method, lr), paths in cells.items():
        paths.sort(key=lambda p: int(RUN_NAME.match(p.name)["seed"]))
        planned = PLANNED_SEEDS_X if folder.name == x_regime else PLANNED_SEEDS
        for seed in range(planned):
            target = folder / f"{method}-lr{lr}-s{seed}.json"
            if not target.exists():
                record = json.loads(paths[seed % len(paths)].read_text())
                record["config"]["seed"] = seed
                target.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Both analyses of one frozen copy, so a run landing mid-test cannot split them."""
    if not DATA.is_dir():
        pytest.skip("no study 2 data in this checkout")
    snapshot = tmp_path_factory.mktemp("study2") / "study2"
    shutil.copytree(DATA, snapshot)
    return analyse_both(snapshot)


def test_x_regime_follows_the_pilot_rule(both):
    """The project's X is the candidate section 4's rule accepts on the pilot's runs."""
    assert pilot_x(both["runs"]) == both["study"]["x"]


def test_family_is_the_preregistered_fifteen(both):
    """The project decides exactly section 5's hypotheses (an X was accepted)."""
    assert both["mine"] is not None, "no X accepted: the family would have ten hypotheses"
    assert set(both["theirs"]) == {spec.id for spec in SPECS}


def test_seeds_estimates_p_and_holm_agree(both):
    """Seed counts, estimates with intervals, p and Holm p match the project's."""
    found = mismatches(both["mine"], both["theirs"])
    assert not found, "\n".join(found)


def test_verdicts_follow_the_decision_rule(both):
    """In progress: every verdict says so (section 1). Complete: section 5's rule."""
    theirs = {key: o.verdict.strip().lower() for key, o in both["theirs"].items()}
    if not family_complete(both["mine"]):
        assert theirs == {spec.id: IN_PROGRESS for spec in SPECS}
        return
    # Complete: the project must have applied Holm over all fifteen.
    assert all(close(both["mine"][s.id].p_adj, both["theirs"][s.id].p_adj) for s in SPECS)
    assert theirs == {s.id: expected_verdict(s, both["mine"][s.id]) for s in SPECS}


def test_decision_rule_on_a_completed_copy(both, tmp_path):
    """Made-up completion of the family: numbers, Holm over all fifteen, and verdicts.

    Until the study ends the real data only reach the in-progress branch; this checks
    the final branch of the project's rule against section 5 now.
    """
    root = tmp_path / "study2"
    shutil.copytree(DATA, root)
    complete_copy(root, both["study"]["x"])
    result = analyse_both(root)
    mine, theirs = result["mine"], result["theirs"]
    assert family_complete(mine)
    found = mismatches(mine, theirs)
    assert not found, "\n".join(found)
    assert all(close(mine[s.id].p_adj, theirs[s.id].p_adj) for s in SPECS)
    verdicts = {key: o.verdict.strip().lower() for key, o in theirs.items()}
    assert verdicts == {s.id: expected_verdict(s, mine[s.id]) for s in SPECS}
